"""ImageFolder trees: ROOT/SPLIT/CLASS/*.jpg (any extension PIL reads).

A sample is a file directly inside a class folder, with an image suffix and a name that does
not start with "."; a symbolic link counts as its target, and a broken one is a sample that
cannot be read (data.on_corrupt decides). Everything else under the split folder (files next
to the class folders, folders inside class folders, hidden files and folders, other suffixes)
is not a sample: it is listed in `SplitSource.ignored`, which extraction logs and writes to
the manifest.

The content stamp of a sample is its file's size and modification time in nanoseconds (one
stat, no read): a file rewritten in any ordinary way changes it. It misses only a replacement
of equal size whose mtime was preserved or reset (cp -p, rsync -a, touch -r from another file).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cache import ConfigError
from pipeline.data.source import SplitSource, read_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
STAMPS_COVER = "path, label, size and mtime_ns of every image file"


def is_image_name(name: str) -> bool:
    """A file name that can be a sample: an image suffix, and not hidden (.DS_Store, macOS's
    ._photo.jpg resource forks, which are not images)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")


def image_folder_split(root: str | Path, split: str) -> SplitSource:
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise ConfigError(
            f"data.root: split folder {str(split_dir)!r} does not exist"
            + (f"; splits present: {present}" if present else f"; {str(root)!r} is not a directory")
        )
    classes, ignored = [], []
    for entry in _entries(split_dir):
        if entry.is_dir() and not entry.name.startswith("."):
            classes.append(entry.name)
        else:
            ignored.append(entry.name + ("/" if entry.is_dir() else ""))
    if not classes:
        raise ConfigError(f"{str(split_dir)!r} has no class folders (expected SPLIT/CLASS/*.jpg)")
    ids, labels, stamps = [], [], []
    for label, cls in enumerate(classes):
        for entry in _entries(split_dir / cls):
            rel = f"{cls}/{entry.name}"
            image_name = is_image_name(entry.name)
            if image_name and entry.is_file():
                st = entry.stat()  # follows a symbolic link: the target's size and mtime
                stamps.append(f"{st.st_size}:{st.st_mtime_ns}")
            elif image_name and entry.is_symlink() and not os.path.exists(entry.path):
                stamps.append("broken link")  # a sample that cannot be read; on_corrupt decides
            else:
                ignored.append(rel + ("/" if entry.is_dir() else ""))
                continue
            ids.append(rel)
            labels.append(label)
    if not ids:
        raise ConfigError(f"{str(split_dir)!r} holds no images with suffixes {sorted(IMAGE_SUFFIXES)}")

    def load(i: int):
        return read_image(split_dir / ids[i])

    return SplitSource(split, ids, np.asarray(labels, dtype=np.int64), classes, load,
                       sample_stamps=stamps, stamps_cover=STAMPS_COVER, ignored=sorted(ignored))


def _entries(directory: Path) -> list[os.DirEntry]:
    """The folder's entries by name; a name that is not valid UTF-8 is refused (ids, the
    manifest and the fingerprint are UTF-8 text: it would crash them half-way)."""
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    bad = [e.name for e in entries if not _utf8(e.name)]
    if bad:
        shown = ", ".join(repr(os.fsencode(n)) for n in bad[:3])
        raise ConfigError(f"data.root: {len(bad)} name(s) in {str(directory)!r} are not valid UTF-8 ({shown}); rename them")
    return entries


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes become lone surrogates (os.fsdecode)
        return False
    return True
