"""One writer at a time: an exclusive lease on a store, held from create/resume to finalize.

Two extractions writing one store would mix two backbones' arrays under one manifest, and an
--overwrite under a running extraction would inherit the old process's split, stamped. So
every writer takes the lease first; a second one gets one line naming the holder.

- Local stores: the lease is a sibling file `.NAME.lease` held with flock(LOCK_EX). The
  kernel drops the lock when its holder dies (kill -9 included), so a stale lease is simply
  free: nothing to detect, nothing to clean up by hand. The file records the holder (host,
  pid, start time) for the refusal message and is removed on release. After locking, the
  holder checks that the path still names the file it locked (a releaser may have unlinked it
  in between) and retries otherwise.
- Object stores: the lease is the object `NAME.lease` beside the prefix, created with a
  conditional PUT (If-None-Match: *), so of two writers exactly one succeeds. There is no
  kernel to release it: a lease whose holder ran on this host under a pid that is no longer
  alive is taken over; any other is refused with its holder named (delete the object if that
  process is gone). The takeover overwrites exactly the stale object seen (PUT If-Match its
  ETag), so of two writers that found it, one wins; release deletes only the holder's own
  object (DELETE If-Match; without it, the object whose content is the holder's). A server
  without conditional writes, or a botocore that cannot send If-Match (before 1.35.69: s3fs
  would drop it silently), is refused with that reason.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import time
from typing import Optional

from cache.errors import StoreError
from cache.local_files import pid_alive
from cache.location import StoreLocation

log = logging.getLogger(__name__)


def _precondition_failed(e: Exception) -> bool:
    """A conditional request refused: S3's PreconditionFailed (HTTP 412), read from the client
    error that s3fs's OSError wraps (never from message text, which may hold any number)."""
    for error in (e, e.__cause__, e.__context__):
        response = getattr(error, "response", None)
        if isinstance(response, dict) and (response.get("Error", {}).get("Code") == "PreconditionFailed"
                                           or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412):
            return True
    return False


@functools.cache
def _client_sends_if_match() -> bool:
    """Whether this botocore knows If-Match on PutObject and DeleteObject (1.35.69 and later):
    s3fs silently drops arguments its botocore does not know, which would make a conditional
    takeover an unconditional one."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    return all("IfMatch" in model.operation_model(op).input_shape.members for op in ("PutObject", "DeleteObject"))


_TAKEN_OVER = "store %s: the lease is no longer this process's (another writer took it over); left to it"


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process (holder unknown)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started_at')})"


class StoreLease:
    """Context manager; `release()` is idempotent."""

    def __init__(self, location: StoreLocation, what: str = "store"):
        self.location = location
        self.what = what  # what the refusal calls the leased path: a store, a sweep's output folder
        self._fd: Optional[int] = None
        self._remote_key: Optional[str] = None
        self._etag: Optional[str] = None  # of the lease object this process wrote
        self._holder: Optional[dict] = None  # what it wrote there

    # -- local ----------------------------------------------------------------------------
    @property
    def local_path(self):
        path = self.location.path
        return path.parent / f".{path.name}.lease"

    def _acquire_local(self) -> None:
        import fcntl

        path = self.local_path
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise StoreError(f"{self.what} {str(self.location)!r} is being written by {_describe(self._read_local())}; "
                                 "wait for it to finish (one writer at a time)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its releaser had just unlinked: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())
        os.fsync(fd)
        self._fd = fd

    def _read_local(self) -> Optional[dict]:
        try:
            return json.loads(self.local_path.read_text() or "null")
        except (OSError, ValueError):
            return None

    # -- object stores --------------------------------------------------------------------
    def _acquire_remote(self) -> None:
        fs, root = self.location._fs()
        key = root.rstrip("/") + ".lease"
        bucket, name, _ = fs.split_path(key)
        self._holder = _holder()
        body = json.dumps(self._holder).encode()
        try:
            reply = fs.pipe_file(key, body, mode="create")
        except FileExistsError:
            pass
        except Exception as e:  # the server answered something other than "exists"
            if not _precondition_failed(e):
                raise StoreError(f"{self.what} {str(self.location)!r}: cannot take the writer's lease with a conditional "
                                 f"create (If-None-Match) on this server ({type(e).__name__}: {e}); refusing to write "
                                 "without one") from e
        else:  # ours: only this process replaces or deletes this version of it
            self._remote_key = key
            self._etag = reply.get("ETag") if isinstance(reply, dict) else None
            return
        etag = self._etag_of(fs, key)  # before the body: a body read later is of this version or a newer one
        holder = self._read_remote(fs, key)
        if etag and holder and holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1))):
            if not _client_sends_if_match():
                raise StoreError(f"{self.what} {str(self.location)!r}: the lease of {_describe(holder)} is stale, but this botocore "
                                 "cannot send a conditional PUT (If-Match; botocore >= 1.35.69) to take it over safely; upgrade "
                                 f"it, or delete {key} if that process is gone")
            try:  # replace exactly the stale object seen: another writer that replaced it first makes this fail
                reply = fs.call_s3("put_object", Bucket=bucket, Key=name, Body=body, IfMatch=etag)
            except Exception as e:
                if not _precondition_failed(e):
                    raise StoreError(f"{self.what} {str(self.location)!r}: cannot take over the stale lease of {_describe(holder)} "
                                     f"with a conditional PUT (If-Match) on this server ({type(e).__name__}: {e}); delete {key} "
                                     "if that process is gone") from e
                raise StoreError(f"{self.what} {str(self.location)!r}: another writer took over the stale lease of "
                                 f"{_describe(holder)} first; one writer at a time") from None
            log.warning("store %s: took over the lease of %s, which is no longer running", self.location, _describe(holder))
            self._remote_key, self._etag = key, reply["ETag"]
            return
        raise StoreError(f"{self.what} {str(self.location)!r} is being written by {_describe(holder)}; wait for it to finish, "
                         f"or delete {key} if that process is gone (one writer at a time)")

    @staticmethod
    def _etag_of(fs, key: str) -> Optional[str]:
        try:
            fs.invalidate_cache(key)
            return fs.info(key)["ETag"]
        except (OSError, KeyError):
            return None

    @staticmethod
    def _read_remote(fs, key: str) -> Optional[dict]:
        try:
            fs.invalidate_cache(key)
            return json.loads(fs.cat_file(key))
        except (OSError, ValueError):
            return None

    # -- both -----------------------------------------------------------------------------
    def writer(self) -> Optional[str]:
        """Who writes here now, described, or None; it takes no lock (a reader's probe must
        never make a starting writer fail its own). Local: the lease file's holder, when it is a
        live process of this host (a killed writer's file stays; another host's holder cannot
        be checked and is named); an object store: its lease object, even a stale one."""
        if self.location.is_local:
            holder = self._read_local()
            if not holder or holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", 0))):
                return None
            return _describe(holder)
        fs, root = self.location._fs()
        holder = self._read_remote(fs, root.rstrip("/") + ".lease")
        return _describe(holder) if holder else None

    def acquire(self) -> "StoreLease":
        if self.location.is_local:
            self._acquire_local()
        else:
            self._acquire_remote()
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                self.local_path.unlink(missing_ok=True)  # unlink while still holding the lock
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
        if self._remote_key is not None:
            fs, _ = self.location._fs()
            self._delete_own(fs)
            self._remote_key = self._etag = None

    def _delete_own(self, fs) -> None:
        """Delete the lease object only while it is this process's: by its ETag (DELETE If-Match),
        else, where the client or the server cannot make a delete conditional, by its content."""
        key = self._remote_key
        if self._etag is not None and _client_sends_if_match():
            bucket, name, _ = fs.split_path(key)
            try:
                fs.call_s3("delete_object", Bucket=bucket, Key=name, IfMatch=self._etag)
                return
            except FileNotFoundError:
                log.warning("store %s: the lease object %s was already gone (deleted by hand?)", self.location, key)
                return
            except Exception as e:
                if _precondition_failed(e):
                    log.warning(_TAKEN_OVER, self.location)
                    return
                # A server without conditional deletes: decided by content below.
                log.info("store %s: a conditional delete of the lease failed (%s); deleting it by its content", self.location, e)
        current = self._read_remote(fs, key)
        if current == self._holder:
            fs.rm_file(key)
        elif current is not None:
            log.warning(_TAKEN_OVER, self.location)

    def __enter__(self) -> "StoreLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
