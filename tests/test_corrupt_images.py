"""A corrupt image never silently becomes a wrong sample."""

import pytest

from cache import open_store
from pipeline.data import CorruptImageError
from pipeline.runners.extract import run_extract
from tests.conftest import tiny_config


@pytest.fixture
def folder_with_corrupt(image_folder):
    bad = image_folder / "train" / "dog" / "dog_001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    (image_folder / "train" / "eel" / "eel_002.jpg").write_bytes(b"not an image at all")
    return image_folder


def test_fail_names_the_file(tmp_path, folder_with_corrupt):
    with pytest.raises(CorruptImageError, match=r"dog_001\.jpg"):
        run_extract(tiny_config(tmp_path, folder_with_corrupt))


def test_skip_counts_lists_and_hides_them(tmp_path, folder_with_corrupt):
    cfg = tiny_config(tmp_path, folder_with_corrupt, "data.on_corrupt=skip")
    run_extract(cfg)
    reader = open_store(cfg.store.path)
    assert reader.manifest.skipped == {"train": ["dog/dog_001.jpg", "eel/eel_002.jpg"]}
    assert reader.valid("train").sum() == 10
    seen = sorted(i for b in reader.batches("train", ["blocks.0"], 3) for i in b.indices.tolist())
    assert seen == [i for i in range(12) if i not in (5, 10)]
