"""trials.jsonl: one JSON line per finished trial, appended by the driver only.

Each line is written with one `os.write` on an O_APPEND descriptor, then fsynced, so a crash
leaves at most a partial last line. On open, such a tail is cut off (a later append would
otherwise glue onto it) and the trials it named simply run again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class TrialsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}  # trial id -> row, first row wins
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted write", self.path, len(data) - complete)
            os.truncate(self.path, complete)
        for number, line in enumerate(data[:complete].decode().splitlines(), 1):
            try:
                row = json.loads(line)
                trial = row["trial"]
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s:%d: not a trial row, ignored", self.path, number)
                continue
            self.rows.setdefault(trial, row)

    def append(self, row: dict) -> None:
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"{self.path}: wrote {written} of {len(line)} bytes of a trial row (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows.setdefault(row["trial"], row)
