"""Where a store lives: a local directory, or an fsspec URL such as s3://bucket/prefix.

A string with "://" is an fsspec URL, opened with zarr's FsspecStore (s3fs for s3://, which is
asynchronous, as FsspecStore wants); anything else is a local path, opened with LocalStore as
before. Object stores have no rename, so the writer builds a store on one in place (see
cache/writer.py); this module only answers what is there, opens it and deletes objects.

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws), the endpoint from AWS_ENDPOINT_URL(_S3) or `storage_options` (passed to fsspec as
they are, e.g. {endpoint_url: ..., client_kwargs: {region_name: ...}}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import zarr
from zarr.storage import FsspecStore, LocalStore

# Configs are saved beside every output and in the store's manifest, so secrets must not be in them.
SECRET_OPTIONS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def option_problems(path: str, options: Mapping[str, Any]) -> list[str]:
    """Config-time checks (no I/O), each naming the key and what was expected."""
    out = []
    if options and not is_url(path):
        out.append(f"storage_options: got {sorted(options)}, but {path!r} is a local path; they are for an fsspec URL such as s3://bucket/prefix")
    secrets = sorted(_secret_keys(options))
    if secrets:
        out.append(f"storage_options: {secrets} would be saved with every output and in the store's manifest; "
                   "give credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    return out


def _secret_keys(options: Mapping[str, Any]) -> set[str]:
    found = {k for k in options if k in SECRET_OPTIONS}
    for value in options.values():
        if isinstance(value, Mapping):
            found |= _secret_keys(value)
    return found


@dataclass(frozen=True)
class StoreLocation:
    url: str  # a local path as given, or an fsspec URL
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.url

    @property
    def is_local(self) -> bool:
        return not is_url(self.url)

    @property
    def path(self) -> Path:
        assert self.is_local, f"{self.url} is not a local path"
        return Path(self.url)

    def open_group(self, mode: str) -> zarr.Group:
        read_only = mode == "r"
        if self.is_local:
            store = LocalStore(self.url, read_only=read_only)
        else:
            store = FsspecStore.from_url(self.url, storage_options=dict(self.storage_options), read_only=read_only)
        return zarr.open_group(store, mode=mode, zarr_format=3)  # ours are v3: no probing for v2 metadata objects

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
