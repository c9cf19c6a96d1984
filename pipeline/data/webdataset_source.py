"""WebDataset tar shards as a split: local paths or fsspec URLs (s3://...), in shard then member order.

A WebDataset sample is the run of consecutive tar members that share a key (webdataset's own
`base_plus_ext`: the member name up to its first dot): `cat/cat_000.jpg` + `cat/cat_000.cls`
is sample `cat/cat_000`. Opening a split reads every shard's tar headers once (not the image
data) into an index of where each sample's image member lies, so that loading sample i reads
only that member's bytes, with one ranged read: a resumed extraction reads only the images of
its missing chunks, and each dask piece only its own. The shards come from
`data.shards[split]`: a brace pattern (`train-{000000..000009}.tar`, expanded by webdataset's
`braceexpand`) or a list, each relative to `data.root` unless absolute or a URL.

- Sample id: `<shard as listed>/<key>` (the listed name, relative to data.root or the URL). Label: the integer in the label member (`.cls` text,
  as webdataset's writer stores it); class names from `data.classes`, else "0".."max".
- Image: the first of the members named by `data.image_key` (`jpg;png`: webdataset's
  alternatives syntax), decoded as image files are (`pipeline.data.source.decode_image`); a
  missing or undecodable image is a corrupt sample (`on_corrupt`). A sample without a label,
  or a label that is not an integer, is refused with its shard and key: there is no label to store.
- A shard that is not a tar file, ends inside a member, or lacks tar's end-of-archive blocks
  (cut at a member boundary) is refused, named: a truncated shard never loses samples silently.
- Fingerprint: per shard its name, size and the sha256 of its member index (names, sizes,
  modification times, offsets) and labels, the headers only: a member rewritten in place with
  the same size and mtime is not noticed, as for image folders.
- On object storage the header pass reads through fsspec's read-ahead blocks, which for
  shards of small images is most of the shard; image reads are exact byte ranges.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Optional

import numpy as np

from cache import ConfigError, FeatureCacheError, is_url, require_extra
from pipeline.data.source import CorruptImageError, SplitSource, class_names, decode_image

END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)  # tar ends with two zero blocks


class ShardError(FeatureCacheError):
    """A tar shard that cannot be read as one: not a tar file, truncated, or a sample without a label."""


@dataclass(frozen=True)
class _Member:
    shard: int
    offset: int  # of the member's data in the shard file
    size: int


def shard_names(shards: str | list[str]) -> list[str]:
    """The split's shards as listed: a brace pattern or a list, expanded; each once."""
    require_extra("data.kind webdataset", "webdataset", "webdataset", "braceexpand")
    from braceexpand import braceexpand

    names = [n for pattern in ([shards] if isinstance(shards, str) else shards) for n in braceexpand(pattern)]
    repeated = sorted(n for n, count in Counter(names).items() if count > 1)
    if repeated:
        raise ConfigError(f"data.shards: {repeated[:3]} listed more than once; every sample would be stored twice")
    return names


def shard_file(path: str) -> str:
    """One spelling per local shard file (./, .., links resolved); a URL as given (object keys
    are names: "a//b" and "a/b" are two objects)."""
    return path if is_url(path) else os.path.realpath(path)


def _filesystem(path: str, storage_options: dict):
    """fsspec's filesystem and path for a shard, local or at a URL (fsspec caches the instances)."""
    from fsspec.core import url_to_fs

    return url_to_fs(path, **storage_options)


def _read_range(path: str, start: int, size: int, storage_options: dict) -> bytes:
    fs, where = _filesystem(path, storage_options)
    return fs.cat_file(where, start=start, end=start + size)


def _index_shard(path: str, number: int, label_key: str, storage_options: dict) -> tuple[list[tuple], int]:
    """(key, extension, where, header, payload) of every regular member, in order, payload the
    bytes of label members (read in the same pass; images are not read); and the shard's size."""
    from webdataset.tariterators import base_plus_ext

    members = []
    try:
        fs, where = _filesystem(path, storage_options)
        with fs.open(where, "rb") as f:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    if info.offset_data + info.size > size:
                        raise ShardError(f"shard {path!r} is truncated: member {info.name!r} ends at byte "
                                         f"{info.offset_data + info.size}, the file has {size}")
                    key, ext = base_plus_ext(info.name)
                    if key is None:  # no extension: not part of any sample (webdataset skips it too)
                        continue
                    ext = ext.lower()
                    payload = tar.extractfile(info).read() if ext == label_key else None
                    members.append((key, ext, _Member(number, info.offset_data, info.size), info, payload))
                end = tar.offset
            f.seek(end)
            if f.read(len(END_OF_ARCHIVE)) != END_OF_ARCHIVE:
                raise ShardError(f"shard {path!r} is truncated: no end-of-archive blocks after its last member "
                                 f"(byte {end} of {size}); members after that point would be lost")
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"shard {path!r} is not a readable tar file (truncated or corrupt): {type(e).__name__}: {e}") from e
    except FileNotFoundError as e:
        raise ConfigError(f"data.shards: shard {path!r} does not exist") from e
    return members, size


def webdataset_split(root: str, shards: str | list[str], split: str, image_key: str, label_key: str,
                     classes: Optional[list[str]], storage_options: dict) -> SplitSource:
    listed = shard_names(shards)
    paths = [n if is_url(n) or n.startswith("/") else f"{root.rstrip('/')}/{n}" for n in listed]
    if not paths:
        raise ConfigError(f"data.shards.{split}: the pattern names no shard")
    files = [shard_file(p) for p in paths]
    twice = sorted({listed[i] for i, f in enumerate(files) if files.count(f) > 1})
    if twice:
        raise ConfigError(f"data.shards.{split}: {twice[:4]} name one shard file more than once; every sample would be stored twice")
    image_exts = [e.lower() for e in image_key.split(";")]
    label_key = label_key.lower()
    ids, labels, images = [], [], []
    digest = hashlib.sha256()
    for number, path in enumerate(paths):
        members, size = _index_shard(path, number, label_key, storage_options)
        shard_hash = hashlib.sha256()
        for _, _, where, info, payload in members:
            shard_hash.update(f"{info.name}\t{info.size}\t{info.mtime}\t{where.offset}\t{payload!r}\n".encode())
        name = listed[number]  # as listed (under data.root or a URL): two shards never share one
        digest.update(f"{PurePosixPath(path).name}\t{size}\t{shard_hash.hexdigest()}\n".encode())
        for key, group in _samples(members):
            label = group.get(label_key)
            if label is None:
                raise ShardError(f"shard {path!r}, sample {key!r}: no {label_key!r} member (data.label_key); it has {sorted(group)}")
            ids.append(f"{name}/{key}")
            labels.append(_label(path, label, key))
            images.append(next((group[e] for e in image_exts if e in group), None))
            # Which member is the image (data.image_key picks one of several): another choice is other pixels.
            digest.update(f"{ids[-1]}\t{None if images[-1] is None else images[-1].offset}\n".encode())
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:  # webdataset's writer never repeats a key in a shard; a concatenated tar can, apart
        raise ShardError(f"data.shards.{split}: sample key(s) {repeated[:3]} occur more than once in one shard; a sample is "
                         "the members with one key, once")
    labels = np.asarray(labels, dtype=np.int64)
    names = class_names(labels, classes, None, lambda i: f"sample {ids[i]!r}")

    def load(i: int):
        where = images[i]
        if where is None:
            raise CorruptImageError(f"sample {ids[i]!r} has no image member ({image_key}, data.image_key)")
        path = paths[where.shard]
        return decode_image(_read_range(path, where.offset, where.size, storage_options), f"sample {ids[i]!r} of {path!r}")

    return SplitSource(split, ids, labels, names, load, content_hash=digest.hexdigest(), origins=files,
                       stamps_cover="tar shards: names, sizes and per-shard sha256 of member names, sizes, mtimes, offsets and labels; "
                                    "each sample's image member")


def _samples(members) -> list[tuple[str, dict]]:
    """Consecutive members with one key form a sample (webdataset's grouping): key -> {extension:
    where (images) or bytes (labels)}."""
    out: list[tuple[str, dict]] = []
    for key, ext, where, info, payload in members:
        if not out or out[-1][0] != key:
            out.append((key, {}))
        if ext in out[-1][1]:  # a key written twice in a row: the first image would be paired with the last label
            raise ShardError(f"member {info.name!r} occurs twice in a row in its shard (data.shards); a sample is the members "
                             "with one key, once each")
        out[-1][1][ext] = payload if payload is not None else where
    return out


def _label(path: str, payload: bytes, key: str) -> int:
    text = payload.decode("utf-8", errors="replace").strip()
    try:
        return int(text)
    except ValueError:
        raise ShardError(f"shard {path!r}, sample {key!r}: label {text[:40]!r} is not an integer class index") from None
