"""What a config, a store's manifest or an adapter may make the pipeline do, and what it saves.

- storage_options: only options that are never secret are taken (configs are saved in the
  store's manifest and beside every run); the allowlist is checked against what s3fs and
  botocore themselves accept and mark sensitive, not against our own list.
- A store URL with credentials in it is refused, without repeating them, at config time and
  at run time.
- model_kwargs reach timm.create_model only when they choose the architecture: never one that
  loads or fetches a file, whether from a config or a fingerprint (a store's or an adapter's).
- A local dask cluster listens on 127.0.0.1 only, its dashboard included (as the OS reports it).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import pytest
import timm

from cache import Fingerprint, StoreError, open_store
from cache.location import SAFE_OPTIONS, StoreLocation
from pipeline.backbones.build import build_backbone
from pipeline.cli import main
from pipeline.config import ConfigError, SweepConfig, TrainConfig, build, to_dict
from pipeline.config.extract_config import BackboneConfig, PreprocessConfig
from pipeline.runners.predict import run_predict
from pipeline.training.frozen_backbone import rebuild_backbone
from tests.conftest import tiny_config

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"  # looks like an AWS secret key: holds '/' and '+'
URL = "s3://bucket/features/store.zarr"


def _configs(storage_options: dict, url: str = URL) -> dict:
    """The same storage settings in each kind of config that takes them."""
    return {
        "extract": lambda: tiny_config(Path("unused"), Path("images"), store={"path": url, "storage_options": storage_options}),
        "train": lambda: build(TrainConfig, {"store": url, "storage_options": storage_options, "output": "o", "adapters": [{"kind": "linear"}]}),
        "sweep": lambda: build(SweepConfig, {"store": url, "storage_options": storage_options, "output": "o", "space": [{"kind": "linear"}]}),
    }


KEY_PREFIX = {"extract": "store.", "train": "", "sweep": ""}  # where each config keeps the store's settings


# -- storage_options ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["extract", "train", "sweep"])
def test_storage_options_outside_the_allowlist_are_refused_by_name(kind):
    options = {"endpoint": "http://h:9000", "s3_additional_kwargs": {"ServerSideEncryption": "AES256", "SSECustomerAlgorithm": "AES256",
                                                                    "SSECustomerKey": SECRET}}
    with pytest.raises(ConfigError) as e:
        _configs(options)[kind]()
    text, problems = str(e.value), e.value.problems
    p = KEY_PREFIX[kind]
    assert len(problems) == 3, problems  # every refused key at once, the allowed one not among them
    assert any(x.startswith(f"{p}storage_options.endpoint: not an allowed storage option") and "did you mean 'endpoint_url'?" in x for x in problems)
    sse = [x for x in problems if x.startswith(f"{p}storage_options.s3_additional_kwargs.SSECustomerKey: not an allowed storage option")]
    allowed = "['ACL', 'BucketKeyEnabled', 'ExpectedBucketOwner', 'RequestPayer', 'ServerSideEncryption', 'StorageClass']"
    assert len(sse) == 1 and f"allowed here: {allowed}" in sse[0]
    assert any(x.startswith(f"{p}storage_options.s3_additional_kwargs.SSECustomerAlgorithm:") for x in problems)
    assert SECRET not in text


def test_safe_storage_options_are_taken_and_saved_as_given():
    options = {"endpoint_url": "http://minio.local:9000", "anon": False, "use_ssl": False, "requester_pays": True,
               "default_block_size": 8 << 20, "profile": "research",
               "client_kwargs": {"region_name": "eu-west-1", "verify": False},
               "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 3, "mode": "standard"}, "s3": {"addressing_style": "path"}},
               "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "ACL": "bucket-owner-full-control"}}
    for kind, make in _configs(options).items():
        cfg = make()
        saved = to_dict(cfg)["store"]["storage_options"] if kind == "extract" else to_dict(cfg)["storage_options"]
        assert saved == options


def test_the_allowlist_holds_only_what_s3fs_and_botocore_take_and_nothing_they_call_secret():
    """The oracle is s3fs's and botocore's own signatures and S3 service model."""
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]' installs it)")
    import botocore.config
    import botocore.session
    from fsspec.dircache import DirCache

    takes = set(inspect.signature(s3fs.S3FileSystem.__init__).parameters) | set(inspect.signature(DirCache.__init__).parameters)
    takes.add("skip_instance_cache")  # fsspec's instance cache, taken by every filesystem class
    takes |= set(inspect.signature(botocore.session.Session.__init__).parameters)  # s3fs's other kwargs make its session: profile
    credentials = {"key", "secret", "token", "username", "password", "session"}
    assert credentials <= takes  # the oracle knows them, and the allowlist refuses them:
    assert set(SAFE_OPTIONS) <= takes - credentials

    session = botocore.session.get_session()
    client_args = set(inspect.signature(session.create_client).parameters)
    assert set(SAFE_OPTIONS["client_kwargs"]) <= {a for a in client_args if not a.startswith("aws_")} - {"service_name", "config"}
    assert set(SAFE_OPTIONS["config_kwargs"]) <= set(botocore.config.Config.OPTION_DEFAULTS) - {"proxies", "proxies_config", "client_cert"}

    s3 = session.get_service_model("s3")
    members: dict[str, list[bool]] = {}
    for op in s3.operation_names:
        shape = s3.operation_model(op).input_shape
        for name, member in (shape.members.items() if shape else ()):
            members.setdefault(name, []).append(bool(member.metadata.get("sensitive")))
    for name in SAFE_OPTIONS["s3_additional_kwargs"]:
        assert name in members, f"{name} is no S3 request parameter"
        assert not any(members[name]), f"botocore marks {name} sensitive"
    assert any(members["SSECustomerKey"]) and any(members["SSEKMSKeyId"])  # the ones we refuse are the ones it marks


# -- URLs with credentials ------------------------------------------------------------------

@pytest.mark.parametrize("url", [f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/store.zarr", "s3://AKIAIOSFODNN7EXAMPLE@bucket/store.zarr"])
@pytest.mark.parametrize("kind", ["extract", "train", "sweep"])
def test_a_url_with_credentials_is_refused_without_repeating_them(kind, url):
    with pytest.raises(ConfigError) as e:
        _configs({}, url)[kind]()
    key = "store.path" if kind == "extract" else "store"
    assert e.value.problems == [f"{key}: the URL holds credentials (user:secret@ before the bucket); remove them and give credentials "
                                "in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"]
    assert SECRET not in str(e.value) and "AKIA" not in str(e.value)


def test_an_endpoint_with_credentials_is_refused_without_repeating_them():
    with pytest.raises(ConfigError) as e:
        _configs({"client_kwargs": {"endpoint_url": f"http://minio:{SECRET}@h:9000"}})["train"]()
    assert e.value.problems[0].startswith("storage_options.client_kwargs.endpoint_url: the URL holds credentials")
    assert SECRET not in str(e.value)


def test_plain_urls_are_not_mistaken_for_credentials():
    for url in ("s3://bucket/a@b/store.zarr", "s3://bucket/x:y@z", "http://host:9000/data@v2/store.zarr", "s3://bucket//deep/store.zarr"):
        assert StoreLocation(url).url == url
        _configs({}, url)["train"]()


def test_the_url_is_refused_at_run_time_and_never_logged(caplog, capsys):
    url = f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/store.zarr"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(StoreError) as e:
            open_store(url)
        assert main(["-v", "inspect", url]) == 2  # -v: our DEBUG lines too
    out = capsys.readouterr()
    assert "the URL holds credentials" in str(e.value) and "the URL holds credentials" in out.err
    for text in (str(e.value), out.out, out.err, caplog.text):
        assert SECRET not in text and "AKIA" not in text


# -- model_kwargs ---------------------------------------------------------------------------

def test_model_kwargs_that_load_files_are_refused_at_config_time(tmp_path):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, tmp_path, backbone={"model_kwargs": {"checkpoint_path": "/tmp/evil.pth", "pretrained_strict": False,
                                                                   "drop_path_rate": 0.0, "dynamic_img_size": True}})
    problems = e.value.problems
    assert [p.split(":")[0] for p in problems] == ["backbone.model_kwargs.checkpoint_path", "backbone.model_kwargs.pretrained_strict"]
    assert all("allowed: ['in_chans'," in p and "'drop_path_rate'" in p for p in problems)
    with pytest.raises(ConfigError, match="model_kwargs.img_size: got 32; set preprocess.image_size instead"):
        tiny_config(tmp_path, tmp_path, backbone={"model_kwargs": {"img_size": 32, "dynamic_img_size": True}})
    cfg = tiny_config(tmp_path, tmp_path, backbone={"model_kwargs": {"drop_path_rate": 0.0, "global_pool": "avg", "reg_tokens": 0}})
    assert cfg.backbone.model_kwargs == {"drop_path_rate": 0.0, "global_pool": "avg", "reg_tokens": 0}


@pytest.fixture
def create_model_calls(monkeypatch):
    """Every timm.create_model call, refused: the tests below must stop before timm is asked."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        raise AssertionError(f"timm.create_model was called with {kwargs}")

    monkeypatch.setattr(timm, "create_model", spy)
    return calls


def test_a_store_fingerprint_cannot_make_timm_load_a_file(tmp_path, create_model_calls):
    """The backbone VQT trains with is rebuilt from the store's fingerprint (as predict's is)."""
    fingerprint = Fingerprint.from_json({
        "backbone": {"name": "test_vit", "weights": "none", "weights_sha256": "0" * 64,
                     "model_kwargs": {"checkpoint_path": str(tmp_path / "evil.pth")}},
        "layers": [], "storage": {"dtype": "float16", "tokens": "all"},
        "preprocessing": {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9}})
    with pytest.raises(ConfigError, match="backbone.model_kwargs.checkpoint_path: got '.*evil.pth', but only timm.create_model arguments"):
        rebuild_backbone(fingerprint, "store 'a.zarr'")
    assert create_model_calls == []


def test_an_adapter_fingerprint_cannot_make_timm_load_a_file(tmp_path, create_model_calls):
    adapter = tmp_path / "run" / "adapters" / "01_linear"
    adapter.mkdir(parents=True)
    fingerprint = {"backbone": {"name": "test_vit", "weights": "none", "weights_sha256": "0" * 64,
                                "model_kwargs": {"pretrained_cfg_overlay": "file=/etc/passwd"}},
                   "layers": [], "storage": {"dtype": "float16", "tokens": "all", "grid_size": None},
                   "preprocessing": {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9}}
    (adapter / "adapter.json").write_text(json.dumps({"format_version": 1, "kind": "linear", "num_classes": 2, "hparams": {}, "layers": [],
                                                      "class_names": None, "store_fingerprint": fingerprint}))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(ConfigError, match="backbone.model_kwargs.pretrained_cfg_overlay: got 'file=/etc/passwd'"):
        run_predict([str(adapter)], [str(image)])
    assert create_model_calls == []


def test_a_backbone_made_in_code_is_checked_again_before_timm(create_model_calls):
    cfg = BackboneConfig(name="test_vit", weights="none", model_kwargs={"pretrained_cfg_overlay": {"file": "/etc/passwd"}, "depth": 2})
    with pytest.raises(ConfigError) as e:
        build_backbone(cfg, PreprocessConfig())
    assert [p.split(":")[0] for p in e.value.problems] == ["backbone.model_kwargs.pretrained_cfg_overlay"]
    assert create_model_calls == []


# -- the dask dashboard ---------------------------------------------------------------------

@pytest.mark.dask
def test_a_local_cluster_listens_on_loopback_only():
    """Every socket the cluster's processes listen on, as the OS reports them (psutil)."""
    psutil = pytest.importorskip("psutil")
    from distributed import Client

    from pipeline.dask_cluster import local_cluster

    me = psutil.Process()
    before = {c.laddr for c in me.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    with local_cluster(1) as cluster, Client(cluster) as client:
        dashboard_port = cluster.scheduler.http_server.port
        listening = [c.laddr for p in [me, *me.children(recursive=True)]
                     for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN and (p is not me or c.laddr not in before)]
        link = client.dashboard_link
    assert dashboard_port in {a.port for a in listening}
    assert len(listening) >= 3  # scheduler, its dashboard, the worker (and its nanny)
    assert {a.ip for a in listening} == {"127.0.0.1"}, listening
    assert link.startswith(f"http://127.0.0.1:{dashboard_port}/")


def test_the_cluster_host_can_be_chosen(monkeypatch):
    from pipeline.dask_cluster import HOST_ENV, cluster_host

    monkeypatch.delenv(HOST_ENV, raising=False)
    assert cluster_host() == "127.0.0.1"
    monkeypatch.setenv(HOST_ENV, "0.0.0.0")
    assert cluster_host() == "0.0.0.0"
    assert cluster_host("10.1.2.3") == "10.1.2.3"
