"""Where a store lives: a local directory, or an fsspec URL such as s3://bucket/prefix.

A string with "://" is an fsspec URL, opened with zarr's FsspecStore (s3fs for s3://, which is
asynchronous, as FsspecStore wants); anything else is a local path, opened with LocalStore as
before. Object stores have no rename, so the writer builds a store on one in place (see
cache/writer.py); this module only answers what is there, opens it and deletes objects.

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws), the endpoint from AWS_ENDPOINT_URL(_S3) or `storage_options` (passed to fsspec as
they are, e.g. {endpoint_url: ..., client_kwargs: {region_name: ...}}).

Configs are saved in the store's manifest and beside every run, so a config may give only the
storage options of SAFE_OPTIONS, none of which is ever a secret (`option_problems` refuses any
other, naming it and listing the allowed ones), and never a URL with credentials in it
(`user:secret@bucket`), which `StoreLocation` refuses at run time too, without repeating it.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import zarr
from zarr.storage import FsspecStore, LocalStore

from cache.errors import StoreError

# Configs are saved beside every output and in the store's manifest, so secrets must not be in them.
SECRET_OPTIONS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")
CREDENTIALS_ADVICE = "give credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"

# The storage options a config may hold: s3fs.S3FileSystem's and fsspec's own that are never a
# secret. A nested mapping lists the keys allowed inside that option (client_kwargs go to the
# botocore client, config_kwargs to botocore.config.Config, s3_additional_kwargs to every S3
# request); None takes one plain value (a string, number, true/false or null). Anything else,
# SSE-C's SSECustomerKey say, is refused at config time rather than saved.
SAFE_OPTIONS: dict[str, Any] = {
    "endpoint_url": None, "anon": None, "use_ssl": None, "requester_pays": None, "profile": None,
    "default_block_size": None, "default_fill_cache": None, "default_cache_type": None, "version_aware": None,
    "cache_regions": None, "max_concurrency": None, "fixed_upload_size": None, "local_expiry_check": None,
    "use_listings_cache": None, "listings_expiry_time": None, "max_paths": None, "skip_instance_cache": None,
    "client_kwargs": {"region_name": None, "endpoint_url": None, "use_ssl": None, "verify": None, "api_version": None},
    "config_kwargs": {
        "region_name": None, "signature_version": None, "user_agent_extra": None, "connect_timeout": None,
        "read_timeout": None, "max_pool_connections": None, "tcp_keepalive": None,
        "request_checksum_calculation": None, "response_checksum_validation": None,
        "retries": {"max_attempts": None, "total_max_attempts": None, "mode": None},
        "s3": {"addressing_style": None, "use_accelerate_endpoint": None, "use_dualstack_endpoint": None,
               "payload_signing_enabled": None, "us_east_1_regional_endpoint": None},
    },
    "s3_additional_kwargs": {  # none that botocore's S3 model marks sensitive (SSECustomerKey, SSEKMSKeyId...)
        "ServerSideEncryption": None, "BucketKeyEnabled": None, "ACL": None, "StorageClass": None,
        "RequestPayer": None, "ExpectedBucketOwner": None,
    },
}


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def url_has_credentials(url: str | Path) -> bool:
    """True for `scheme://user:secret@bucket/...` or `scheme://user@bucket/...`. A secret may
    hold '/' (AWS secret keys do), so with an '@' anywhere, a ':' before the first '/' that is
    not a port (host:9000) counts too."""
    if not is_url(url) or "@" not in str(url):
        return False
    netloc = str(url).split("://", 1)[1].split("/", 1)[0]
    return "@" in netloc or (":" in netloc and not re.fullmatch(r"[^:]+:\d+", netloc))


CREDENTIALS_IN_URL = "the URL holds credentials (user:secret@ before the bucket); remove them and " + CREDENTIALS_ADVICE


def option_problems(path: str, options: Mapping[str, Any], path_key: str = "path") -> list[str]:
    """Config-time checks (no I/O), each naming the key and what was expected; never repeating
    a value that may be a secret. `path_key` is the config key that holds `path`."""
    out = []
    if not path.strip():  # "" is the current directory: a store written, or replaced, there
        out.append(f"{path_key}: got {path!r}, expected a path or URL")
    if url_has_credentials(path):
        out.append(f"{path_key}: {CREDENTIALS_IN_URL}")
    if options and not is_url(path):
        out.append(f"storage_options: got {sorted(options)}, but {path!r} is a local path; they are for an fsspec URL such as s3://bucket/prefix")
    secrets = sorted(_secret_keys(options))
    if secrets:
        out.append(f"storage_options: {secrets} would be saved with every output and in the store's manifest; {CREDENTIALS_ADVICE}")
    return out + _unsafe_options(options, SAFE_OPTIONS, "storage_options")


def _secret_keys(options: Mapping[str, Any]) -> set[str]:
    found = {k for k in options if k in SECRET_OPTIONS}
    for value in options.values():
        if isinstance(value, Mapping):
            found |= _secret_keys(value)
    return found


def _unsafe_options(options: Mapping[str, Any], allowed: Mapping[str, Any], where: str) -> list[str]:
    """Every option outside the allowlist, by its dotted key; values are never repeated."""
    out = []
    for key, value in options.items():
        if key in SECRET_OPTIONS:
            continue  # reported above, with the advice for credentials
        if key not in allowed:
            near = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            sse = ("S3 encryption with your own key cannot be configured here (ServerSideEncryption: aws:kms without a key id uses the bucket's default key); "
                   if str(key).startswith(("SSECustomer", "SSEKMS")) else "")
            out.append(f"{where}.{key}: not an allowed storage option (configs are saved in the store's manifest and beside every run, "
                       f"so only options that are never secret are taken); {sse}{hint}allowed here: {sorted(allowed)}")
        elif isinstance(allowed[key], Mapping):
            if isinstance(value, Mapping):
                out += _unsafe_options(value, allowed[key], f"{where}.{key}")
            else:
                out.append(f"{where}.{key}: got a {type(value).__name__}, expected a mapping with keys among {sorted(allowed[key])}")
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            out.append(f"{where}.{key}: got a {type(value).__name__}, expected a single value (a string, number or true/false)")
        elif key == "endpoint_url" and url_has_credentials(value):
            out.append(f"{where}.{key}: {CREDENTIALS_IN_URL}")
    return out


@dataclass(frozen=True)
class StoreLocation:
    url: str  # a local path as given, or an fsspec URL
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if url_has_credentials(self.url):  # it would be printed and saved; never repeat it
            raise StoreError(f"a store URL: {CREDENTIALS_IN_URL}")

    def __str__(self) -> str:
        return self.url

    @property
    def is_local(self) -> bool:
        return not is_url(self.url)

    @property
    def path(self) -> Path:
        """The store's real path, symlinks resolved: the writer lease sits beside it and an
        --overwrite replaces it, so a store reached through a link and by its own path is one
        store with one lease (messages keep the path as given: str(self))."""
        assert self.is_local, f"{self.url} is not a local path"
        return Path(self.url).resolve()

    def open_group(self, mode: str) -> zarr.Group:
        read_only = mode == "r"
        if self.is_local:
            store = LocalStore(self.url, read_only=read_only)
        else:
            store = FsspecStore.from_url(self.url, storage_options=dict(self.storage_options), read_only=read_only)
        return zarr.open_group(store, mode=mode, zarr_format=3)  # ours are v3: no probing for v2 metadata objects

    def root_attributes(self) -> dict:
        """The root group's attributes, read now; {} where there is no zarr group."""
        try:
            return self.read_root_attributes()
        except Exception:
            return {}

    def read_root_attributes(self) -> dict:
        """The root group's attributes, read now from its zarr.json in one request (a reader
        checks them after every window); FileNotFoundError where there is none, any other
        error as it came."""
        if self.is_local:
            text = (Path(self.url) / "zarr.json").read_bytes()
        else:
            fs, root = self._fs()
            text = fs.cat_file(root.rstrip("/") + "/zarr.json")
        return json.loads(text).get("attributes", {})

    def exists(self) -> bool:
        if self.is_local:
            return self.path.exists()
        fs, root = self._fs()
        fs.invalidate_cache(root)  # another process (a dask worker, a rerun) may have written since
        return fs.exists(root)

    def holds_nothing(self) -> bool:
        """Nothing there, or an empty directory: a place where a new store may be created."""
        if self.is_local:
            return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))
        fs, root = self._fs()
        fs.invalidate_cache(root)
        try:
            return not fs.ls(root)  # one level: enough to see that something is there
        except FileNotFoundError:
            return True

    def clear(self, keep: str) -> None:
        """Delete every object under this (remote) location except the one at key `keep`."""
        fs, root = self._fs()
        doomed = [p for p in self._objects() if p != keep]
        if doomed:
            fs.rm([f"{root}/{k}" for k in doomed])

    def size_bytes(self, sub: str = "") -> int:
        """Bytes of the files (objects) under `sub`."""
        if self.is_local:
            path = self.path / sub
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
        prefix = sub.rstrip("/") + "/" if sub else ""
        return sum(size for key, size in self._objects().items() if key.startswith(prefix))

    def _objects(self) -> dict[str, int]:
        """Every object under this (remote) location, by key relative to it -> its size."""
        fs, root = self._fs()
        fs.invalidate_cache(root)
        return {p[len(root):].lstrip("/"): info["size"] for p, info in fs.find(root, detail=True).items()}

    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.url, **self.storage_options)


def as_location(path: str | Path | StoreLocation, storage_options: Optional[Mapping[str, Any]] = None) -> StoreLocation:
    if isinstance(path, StoreLocation):
        return path
    return StoreLocation(str(path), dict(storage_options or {}))
