"""Inputs that cannot fool the cache: odd image modes, decompression bombs, files that are not
samples, splits left with no valid sample, changed images, and errors that are one line.

Oracles: numpy arithmetic on the pixels the test wrote, lists of the paths the test created,
and zarr read directly (not through cache/); never the decoding code under test.
"""

import errno
import logging
import os
import struct
import sys
import zlib

import numpy as np
import pytest
import yaml
import zarr
from PIL import Image

import cache.writer
from cache import StoreMismatchError
from pipeline.cli import main
from pipeline.config import ConfigError, ExtractConfig, load_config, to_dict
from pipeline.data import CorruptImageError, open_split, read_image, require_valid_samples
from pipeline.data.source import to_rgb
from pipeline.runners.extract import run_extract
from pipeline.runners.train import run_train
from tests.conftest import colour_folder, tiny_config, write_image_folder
from tests.test_train import train_config


def single_image_folder(root, name, write, classes=("cat", "dog")):
    """ROOT/train/CLASS/... with one ordinary PNG per class, plus `name` written by `write(path)` in cat/."""
    for cls in classes:
        d = root / "train" / cls
        d.mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 60, np.uint8)).save(d / "plain.png")
    write(root / "train" / "cat" / name)
    return root


def load_by_id(root, sample_id):
    source = open_split(load_config_data(root), "train")
    return source.load(source.sample_ids.index(sample_id))


def load_config_data(root):
    return tiny_config(root, root, "data.splits=[train]").data


def rgb_of(image):
    out = np.asarray(image)
    assert image.mode == "RGB" and out.dtype == np.uint8
    return out


# -- image modes ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,mode", [("PNG", "I;16"), ("TIFF", "I;16B")])
def test_16bit_grayscale_is_scaled_to_8_bits(tmp_path, fmt, mode):
    """Pillow's convert("RGB") clips 16-bit values at 255 (an almost white image); the stored
    picture must be round(v * 255 / 65535) = round(v / 257) in every channel."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 65536, (9, 7)).astype(np.uint16)
    raw[0, :5] = [0, 128, 129, 65534, 65535]

    def write(path):
        Image.frombytes(mode, (7, 9), raw.astype(">u2" if mode.endswith("B") else "<u2").tobytes()).save(path, format=fmt)

    root = single_image_folder(tmp_path / "d", f"deep.{fmt.lower()}", write)
    with Image.open(root / "train" / "cat" / f"deep.{fmt.lower()}") as check:
        assert check.mode.startswith("I;16") and np.array_equal(np.asarray(check).astype(np.uint16), raw)  # really 16-bit on disk
    got = rgb_of(load_by_id(root, f"cat/deep.{fmt.lower()}"))
    expected = np.rint(raw.astype(np.float64) / 257.0).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(got[..., channel], expected)
    assert got[0, :5, 0].tolist() == [0, 0, 1, 255, 255]


def test_mode_I_from_png_is_16bit(tmp_path):
    """Older Pillow versions open 16-bit grayscale PNGs as mode I; PNG has no other way to give I."""
    raw = np.array([[0, 300, 40000, 65535]], dtype=np.int32)
    image = Image.fromarray(raw, mode="I")
    image.format = "PNG"
    assert rgb_of(to_rgb(image))[..., 1].tolist() == [[0, 1, 156, 255]]  # round(v / 257)


PALETTE = [10, 20, 30, 200, 100, 50, 0, 255, 0]


def _palette_image(transparent):
    image = Image.new("P", (3, 2))
    image.putpalette(PALETTE)
    image.putdata([0, 1, 2, 2, 1, 0])
    return image, (dict(transparency=0) if transparent else {})


def _expected_palette(transparent):
    lut = np.array(PALETTE, np.uint8).reshape(3, 3)
    out = lut[np.array([[0, 1, 2], [2, 1, 0]])]
    if transparent:
        out[np.array([[0, 1, 2], [2, 1, 0]]) == 0] = 255  # transparent index: white
    return out


ODD_MODES = {
    # name: (image, save kwargs, expected RGB by numpy)
    "1-bit": lambda: (Image.fromarray(np.array([[True, False, True]])), {},
                      np.repeat(np.array([[255, 0, 255]], np.uint8)[..., None], 3, axis=-1)),
    "palette": lambda: (*_palette_image(False), _expected_palette(False)),
    "palette with a transparent index": lambda: (*_palette_image(True), _expected_palette(True)),
    "gray + alpha": lambda: (Image.fromarray(np.array([[[40, 255], [40, 0], [90, 255]]], np.uint8), "LA"), {},
                             np.repeat(np.array([[40, 255, 90]], np.uint8)[..., None], 3, axis=-1)),
    "RGBA": lambda: (Image.fromarray(np.array([[[1, 2, 3, 255], [1, 2, 3, 0]]], np.uint8), "RGBA"), {},
                     np.array([[[1, 2, 3], [255, 255, 255]]], np.uint8)),
    # CMYK (C, M, Y, K) pure inks: no ink is white, full K is black, full C is cyan.
    "CMYK": lambda: (Image.fromarray(np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [255, 0, 0, 0]]], np.uint8), "CMYK"), {},
                     np.array([[[255, 255, 255], [0, 0, 0], [0, 255, 255]]], np.uint8)),
}


@pytest.mark.parametrize("name", list(ODD_MODES))
def test_odd_modes_become_what_a_viewer_shows(tmp_path, name):
    """Transparent pixels are composited over white (not the arbitrary colour under them)."""
    image, save_kwargs, expected = ODD_MODES[name]()
    path = tmp_path / ("x.tif" if image.mode == "CMYK" else "x.png")  # both lossless
    image.save(path, **save_kwargs)
    with Image.open(path) as check:
        assert check.mode == image.mode  # the file really holds that mode
    assert np.array_equal(rgb_of(read_image(path)), expected)


@pytest.mark.parametrize("mode,array", [("F", np.array([[0.0, 0.5, 3.0]], np.float32)),
                                        ("I", np.array([[0, 70000, -5]], np.int32))])
def test_modes_without_a_range_are_refused(tmp_path, mode, array):
    """Float and 32-bit integer images have no defined 8-bit meaning: refused, not clipped."""
    root = single_image_folder(tmp_path / "d", "odd.tif", lambda p: Image.fromarray(array, mode=mode).save(p, format="TIFF"))
    with Image.open(root / "train" / "cat" / "odd.tif") as check:
        assert check.mode == mode
    with pytest.raises(CorruptImageError, match=rf"odd\.tif.*mode {mode}\b.*no defined range"):
        load_by_id(root, "cat/odd.tif")


# -- decompression bombs -------------------------------------------------------------------

def write_bomb_png(path, side=14000):
    """A valid 1-bit PNG of side x side pixels (Pillow refuses more than 2 x 89.5M), ~25 KB on disk."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed black pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.fixture
def folder_with_bomb(image_folder, monkeypatch):
    bomb = image_folder / "train" / "dog" / "dog_009.png"
    write_bomb_png(bomb)
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # only to check the header; restored below
    with Image.open(bomb) as check:
        assert check.size == (14000, 14000) and check.mode == "1"
    monkeypatch.undo()
    return image_folder


def test_decompression_bomb_is_skipped_under_skip(tmp_path, folder_with_bomb):
    cfg = tiny_config(tmp_path, folder_with_bomb, "data.on_corrupt=skip")
    run_extract(cfg)
    root = zarr.open_group(cfg.store.path, mode="r")
    assert root.attrs["feature_cache"]["skipped"] == {"train": ["dog/dog_009.png"]}
    ids = [f"{c}/{c}_{i:03d}.jpg" for c in ("cat", "dog", "eel") for i in range(4)]
    ids.insert(8, "dog/dog_009.png")
    assert np.array_equal(root["train/valid"][:], np.array([i != "dog/dog_009.png" for i in ids]))


def test_decompression_bomb_under_fail_names_the_file(tmp_path, folder_with_bomb):
    with pytest.raises(CorruptImageError, match=r"dog_009\.png.*DecompressionBombError"):
        run_extract(tiny_config(tmp_path, folder_with_bomb))


# -- paths that are not samples ------------------------------------------------------------

def test_paths_that_are_not_samples_are_counted_listed_and_warned(tmp_path, caplog):
    images = write_image_folder(tmp_path / "images")
    train = images / "train"
    jpeg = (train / "cat" / "cat_000.jpg").read_bytes()
    (train / "stray.jpg").write_bytes(jpeg)  # next to the class folders
    (train / "notes.txt").write_text("x")
    (train / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    (train / "cat" / "README.txt").write_text("x")
    (train / "cat" / ".DS_Store").write_bytes(b"\0")
    (train / "cat" / "sub").mkdir()
    (train / "cat" / "sub" / "x.jpg").write_bytes(jpeg)  # nested: not a sample
    os.symlink(tmp_path / "nowhere", train / "cat" / "link")  # broken, no image suffix
    os.symlink(tmp_path / "gone.jpg", train / "dog" / "gone.jpg")  # broken image: a sample that cannot be read
    expected_ignored = [".ipynb_checkpoints/", "cat/.DS_Store", "cat/README.txt", "cat/link", "cat/sub/", "notes.txt", "stray.jpg"]

    cfg = tiny_config(tmp_path, images, "data.on_corrupt=skip")
    with caplog.at_level(logging.WARNING, logger="pipeline.runners.extract"):
        run_extract(cfg)
    manifest = zarr.open_group(cfg.store.path, mode="r").attrs["feature_cache"]
    assert manifest["ignored"] == {"train": expected_ignored}
    assert manifest["classes"] == ["cat", "dog", "eel"]
    assert manifest["skipped"] == {"train": ["dog/gone.jpg"]}
    assert manifest["splits"]["train"]["num_samples"] == 13
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ignored" in r.getMessage()]
    assert len(warnings) == 1 and "split train: 7 path(s)" in warnings[0]


def test_broken_image_link_fails_with_its_name(tmp_path):
    images = write_image_folder(tmp_path / "images")
    os.symlink(tmp_path / "gone.jpg", images / "train" / "dog" / "gone.jpg")
    with pytest.raises(CorruptImageError, match=r"gone\.jpg.*broken symbolic link"):
        run_extract(tiny_config(tmp_path, images))


# -- splits with no valid sample -----------------------------------------------------------

@pytest.fixture(scope="module")
def store_with_dead_val(tmp_path_factory):
    """train: 3 classes x 4 readable images; val: every file unreadable."""
    tmp = tmp_path_factory.mktemp("dead_val")
    images = write_image_folder(tmp / "images", splits=("train",))
    for cls in ("cat", "dog", "eel"):
        (images / "val" / cls).mkdir(parents=True)
        (images / "val" / cls / "x.jpg").write_bytes(b"not an image")
    cfg = tiny_config(tmp, images, "data.on_corrupt=skip", "backbone.layers=[-1]")
    return cfg


def test_extraction_warns_about_a_split_with_no_valid_sample(store_with_dead_val, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.runners.extract"):
        run_extract(store_with_dead_val)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("split val: all 3 sample(s) were skipped") for m in messages), messages
    assert not any(m.startswith("split train: all") for m in messages)


def test_require_valid_samples_names_the_key_and_split(store_with_dead_val):
    """Needs cache/writer.py to store an all-False `valid` shard (see the report): zarr skips a
    chunk equal to its fill value, and the reader then refuses the split as damaged."""
    from cache import open_store

    run_extract(store_with_dead_val)  # complete already when run after the test above
    reader = open_store(store_with_dead_val.store.path)
    require_valid_samples(reader, [("train_split", "train", None), ("test_split", None, None)])  # fine
    with pytest.raises(ConfigError, match=r"test_split: split 'val' has no valid sample \(3 of its 3"):
        require_valid_samples(reader, [("train_split", "train", None), ("test_split", "val", None)])
    # A part of a split (the validation carve) can be empty of valid samples too.
    with pytest.raises(ConfigError, match=r"val_fraction: the 2 sample\(s\) it selects from split 'val' are all invalid"):
        require_valid_samples(reader, [("val_fraction", "val", np.array([True, False, True]))])
    # A carve that leaves one side nothing is said as such, not blamed on unreadable images.
    with pytest.raises(ConfigError) as e:
        require_valid_samples(reader, [("train_split", "train", np.zeros(reader.num_samples("train"), dtype=bool))])
    assert "train_split: selects none of the" in str(e.value) and "skipped" not in str(e.value)


def test_train_refuses_a_split_with_no_valid_sample_before_training(store_with_dead_val, tmp_path):
    """Needs pipeline/runners/train.py `_splits` to call require_valid_samples (see the report)."""
    run_extract(store_with_dead_val)
    out = tmp_path / "run"
    cfg = train_config(store_with_dead_val.store.path, out, [{"kind": "linear"}], epochs=1, test_split="val")
    with pytest.raises(ConfigError, match=r"test_split: split 'val' has no valid sample"):
        run_train(cfg)
    assert not (out / "metrics.jsonl").exists()  # refused before the first epoch


# -- changed images ------------------------------------------------------------------------

OLD_NS = 1_000_000_000_000_000_000  # 2001-09-09: far from "now", whatever the clock's resolution


def bmp_folder(root):
    """Uncompressed BMPs: a replacement with other pixels has exactly the same size."""
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for i in range(3):
            path = d / f"{i}.bmp"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
            os.utime(path, ns=(OLD_NS, OLD_NS))
    return root


def replace_same_size(path):
    before = path.stat().st_size
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path, format="BMP")
    assert path.stat().st_size == before


def test_an_image_replaced_by_one_of_equal_size_is_noticed(tmp_path):
    images = bmp_folder(tmp_path / "images")
    cfg = tiny_config(tmp_path, images, "data.splits=[train]", "backbone.layers=[-1]")
    before = open_split(cfg.data, "train").fingerprint()
    run_extract(cfg)
    replace_same_size(images / "train" / "b" / "1.bmp")
    assert open_split(cfg.data, "train").fingerprint()["samples_sha256"] != before["samples_sha256"]
    # The message says what the hash covers: a copy of the images that did not keep their
    # times is refused too, and the user must be able to tell why.
    with pytest.raises(StoreMismatchError, match=r"dataset\.splits\.train\.samples_sha256: store has '[0-9a-f]{64}', now "
                       r"'[0-9a-f]{64}' \(it covers: path, label, size and mtime_ns of every image file\)"):
        run_extract(cfg)


def test_the_fingerprint_does_not_read_pixels(tmp_path):
    """The documented limit: a same-size replacement whose mtime is set back goes unnoticed."""
    images = bmp_folder(tmp_path / "images")
    cfg = tiny_config(tmp_path, images, "data.splits=[train]").data
    before = open_split(cfg, "train").fingerprint()
    path = images / "train" / "a" / "0.bmp"
    replace_same_size(path)
    os.utime(path, ns=(OLD_NS, OLD_NS))  # as cp -p / rsync -a would
    assert open_split(cfg, "train").fingerprint() == before


# -- one-line errors -----------------------------------------------------------------------

def error_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def write_config(tmp_path, cfg: ExtractConfig):
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return str(path)


def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone:\n  name: test_vit\n   layers: [0]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML: line 3, column 10: mapping values are not allowed here$"):
        load_config(ExtractConfig, str(bad))
    assert main(["extract", str(bad)]) == 2
    assert capsys.readouterr().err == f"error: {bad}: not valid YAML: line 3, column 10: mapping values are not allowed here\n"
    good = write_config(tmp_path, tiny_config(tmp_path, tmp_path))
    with pytest.raises(ConfigError, match=r"override 'store.dtype=\[1,': the value is not valid YAML: line 1, column 4"):
        load_config(ExtractConfig, good, ["store.dtype=[1,"])


def test_on_corrupt_fail_is_one_line_naming_the_file(tmp_path, image_folder, capsys):
    (image_folder / "train" / "eel" / "eel_002.jpg").write_bytes(b"not an image at all")
    assert main(["extract", write_config(tmp_path, tiny_config(tmp_path, image_folder))]) == 2
    line = error_lines(capsys)
    assert "eel_002.jpg" in line and "data.on_corrupt=skip" in line


def test_disk_full_is_one_line_and_keeps_stamped_chunks(tmp_path, image_folder, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, image_folder)  # train: 12 samples = chunks 0, 1 (shard 0) and 2 (shard 1)
    config = write_config(tmp_path, cfg)
    real_write, calls = cache.writer.StoreWriter.write, []

    def full_after_one_shard(self, split, start, *args):
        calls.append((split, start))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, split, start, *args)

    monkeypatch.setattr(cache.writer.StoreWriter, "write", full_after_one_shard)
    assert main(["extract", config]) == 2
    line = error_lines(capsys)
    assert cfg.store.path in line and "no space left" in line and "ENOSPC" in line
    root = zarr.open_group(cfg.store.path, mode="r")
    assert root["train/chunk_done"][:].tolist() == [1, 1, 0]
    kept = root["train/layers/blocks.0"][:8]

    calls.clear()
    monkeypatch.setattr(cache.writer.StoreWriter, "write", lambda self, split, start, *a: calls.append((split, start)) or real_write(self, split, start, *a))
    assert main(["extract", config]) == 0
    assert calls == [("train", 8), ("val", 0), ("val", 8)]  # only what was not stamped
    root = zarr.open_group(cfg.store.path, mode="r")
    assert np.array_equal(root["train/layers/blocks.0"][:8], kept)
    assert root.attrs["feature_cache"]["complete"]


def test_read_only_store_location_is_one_line(tmp_path, image_folder, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, image_folder)

    def read_only(path, *args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(cache.writer, "_create_beside", read_only)
    assert main(["extract", write_config(tmp_path, cfg)]) == 2
    line = error_lines(capsys)
    assert cfg.store.path in line and "read-only" in line and "EROFS" in line


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter")
    images = colour_folder(tmp / "images", per_class=2)
    cfg = tiny_config(tmp, images, "backbone.layers=[-1]")
    run_extract(cfg)
    run_train(train_config(cfg.store.path, tmp / "run", [{"kind": "linear"}], epochs=1, save_top=1))
    return next((tmp / "run" / "adapters").iterdir()), images


def test_predict_names_a_file_that_is_not_an_image(tmp_path, adapter_dir, capsys):
    adapter, images = adapter_dir
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    image = next((images / "val").rglob("*.png"))
    assert main(["predict", "--adapter", str(adapter), str(image), str(notes), "--out", str(tmp_path / "p.csv")]) == 2
    line = error_lines(capsys)
    assert "notes.txt" in line and "cannot read image" in line
    assert not (tmp_path / "p.csv").exists()


def test_predict_names_a_missing_adapter_folder(tmp_path, adapter_dir, capsys):
    adapter, images = adapter_dir
    gone = tmp_path / "runs" / "x" / "adapters" / "01_gone"
    image = next((images / "val").rglob("*.png"))
    assert main(["predict", "--adapter", str(adapter), "--adapter", str(gone), str(image), "--out", str(tmp_path / "p.csv")]) == 2
    line = error_lines(capsys)
    assert f"adapter folder '{gone}' does not exist" in line
    # An image that is not there is named as one (images are positionals, adapters --adapter DIR).
    assert main(["predict", "--adapter", str(adapter), str(gone), "--out", str(tmp_path / "p.csv")]) == 2
    line = error_lines(capsys)
    assert f"image '{gone}' does not exist" in line
    from pipeline.runners.predict import run_predict

    with pytest.raises(ConfigError, match=rf"adapter folder '{gone}' does not exist"):
        run_predict([str(gone)], [str(image)])


# -- skipped samples keep their label -----------------------------------------------------

def test_a_skipped_sample_keeps_its_label(tmp_path, image_folder):
    """The label array holds the true class of every sample; `valid` is what masks skipped ones."""
    (image_folder / "train" / "eel" / "eel_001.jpg").write_bytes(b"broken")
    cfg = tiny_config(tmp_path, image_folder, "data.on_corrupt=skip")
    run_extract(cfg)
    root = zarr.open_group(cfg.store.path, mode="r")
    expected = np.repeat(np.arange(3), 4)  # sorted class folders: cat=0, dog=1, eel=2; 4 images each
    assert np.array_equal(root["train/labels"][:], expected)
    assert root["train/valid"][:].tolist() == [i != 9 for i in range(12)]


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux file systems take a name that is not valid UTF-8")
def test_a_file_name_that_is_not_utf8_is_refused_by_name(tmp_path):
    """Sample ids, the manifest and the fingerprint are UTF-8 text: a latin-1 name crashed them half-way."""
    from pipeline.data.image_folder import image_folder_split

    root = write_image_folder(tmp_path / "images")
    src = next((root / "train" / "cat").iterdir())
    os.rename(os.fsencode(src), os.fsencode(src.parent) + b"/caf\xe9.png")
    with pytest.raises(ConfigError, match=r"1 name\(s\) in .*cat' are not valid UTF-8 \(b'caf\\xe9.png'\); rename them"):
        image_folder_split(root, "train")


def test_a_weights_file_that_does_not_fit_is_one_line_and_one_without_a_classifier_fits(tmp_path):
    """Shapes that differ (a position embedding for another image size) were a raw RuntimeError;
    a checkpoint saved without its classifier was refused, though build drops the classifier."""
    import timm
    from safetensors.torch import save_file

    from pipeline.backbones.build import build_backbone

    def backbone(weights, size=64):
        cfg = tiny_config(tmp_path, tmp_path, f"backbone.weights={weights}", f"preprocess.image_size={size}")
        return build_backbone(cfg.backbone, cfg.preprocess)

    import torch as torch_

    torch_.manual_seed(0)
    full = timm.create_model("test_vit", img_size=64).state_dict()
    save_file(full, str(tmp_path / "full.safetensors"))
    save_file({k: v for k, v in full.items() if not k.startswith("head.")}, str(tmp_path / "headless.safetensors"))
    torch_.save({"model": {k: v for k, v in full.items() if not k.startswith("head.")}}, tmp_path / "wrapped.pth")
    reference = backbone(tmp_path / "full.safetensors").weights_sha256
    assert backbone(tmp_path / "headless.safetensors").weights_sha256 == reference
    assert backbone(tmp_path / "wrapped.pth").weights_sha256 == reference

    with pytest.raises(ConfigError, match=r"does not fit 'test_vit' as configured .*pos_embed"):
        backbone(tmp_path / "full.safetensors", size=96)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"cannot read '.*cut.safetensors' as safetensors"):
        backbone(tmp_path / "cut.safetensors")
    torch_.save(torch_.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ConfigError, match=r"holds a Tensor, not a state dict"):
        backbone(tmp_path / "tensor.pt")
