"""The tamper-evident audit log: one JSON line per request, each carrying the hash of the line before.

A line holds ``seq`` (1, 2, ... across the whole log), ``prev`` (the previous line's ``hash``; 64
zeros for the first) and ``hash`` = sha256 of the line's canonical JSON without ``hash`` (sorted keys,
no spaces). Editing a line breaks its hash; removing or moving one breaks the ``seq`` and ``prev`` of
the line after it; so :func:`verify` names the first line that was altered, removed or reordered.
Key secrets are never written: the key's id and tenant are. Prompts and completions are written only
with ``logContent``, and then PII-redacted (kubetune.gateway.capture).

Rotation: past ``maxBytes`` the file becomes ``PATH.1`` (``PATH.1`` becomes ``PATH.2``, ... up to
``keepFiles``) and a new ``PATH`` continues the chain, so ``verify(PATH)`` checks the rotated files
and the current one as one chain. A restarted gateway continues the chain of the file it finds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

GENESIS = "0" * 64


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def line_hash(record: dict[str, Any]) -> str:
    """The hash of a line: sha256 of its canonical JSON without the ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def rotated_files(path: Path) -> list[Path]:
    """The log's files, oldest first: PATH.N ... PATH.1, PATH (those that exist)."""
    rotated: list[Path] = []
    index = 1
    while (candidate := path.with_name(f"{path.name}.{index}")).exists():
        rotated.append(candidate)
        index += 1
    files = list(reversed(rotated))
    if path.exists():
        files.append(path)
    return files


def _last_line(path: Path) -> bytes | None:
    with path.open("rb") as file:
        file.seek(0, os.SEEK_END)
        end = file.tell()
        block = 4096
        data = b""
        position = end
        while position > 0:
            step = min(block, position)
            position -= step
            file.seek(position)
            data = file.read(step) + data
            lines = data.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or position == 0:
                last = lines[-1]
                return last or None
    return None


class AuditLog:
    """Appends chained lines to a file (rotating it) and/or stdout. Not shared between processes:
    each gateway replica writes its own file (or stdout, which the cluster ships)."""

    def __init__(self, path: Path | None, *, to_stdout: bool, max_bytes: int, keep_files: int) -> None:
        self.path = path
        self.to_stdout = to_stdout
        self.max_bytes = max_bytes
        self.keep_files = keep_files
        self.seq = 0
        self.last_hash = GENESIS
        self._file: IO[bytes] | None = None
        self._size = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._resume(path)
            self._open()

    def _resume(self, path: Path) -> None:
        for candidate in reversed(rotated_files(path)):
            last = _last_line(candidate)
            if last is None:
                continue
            try:
                record = json.loads(last)
                self.seq, self.last_hash = int(record["seq"]), str(record["hash"])
            except (ValueError, KeyError, TypeError):
                # a torn last line (a crash mid-write): the chain restarts visibly, verify reports it
                pass
            return

    def _open(self) -> None:
        assert self.path is not None
        self._file = self.path.open("ab")
        self._size = self._file.tell()

    def _rotate(self) -> None:
        assert self.path is not None and self._file is not None
        self._file.close()
        oldest = self.path.with_name(f"{self.path.name}.{self.keep_files}")
        oldest.unlink(missing_ok=True)
        for index in range(self.keep_files - 1, 0, -1):
            source = self.path.with_name(f"{self.path.name}.{index}")
            if source.exists():
                os.replace(source, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def write(self, event: dict[str, Any]) -> dict[str, Any]:
        """Append ``event`` as the next line; returns the line written (with seq, prev and hash)."""
        record = {**event, "seq": self.seq + 1, "prev": self.last_hash}
        record["hash"] = line_hash(record)
        line = _canonical(record) + b"\n"
        if self._file is not None:
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            assert self._file is not None
            self._file.write(line)
            self._file.flush()
            self._size += len(line)
        if self.to_stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
        self.seq, self.last_hash = record["seq"], record["hash"]
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class Verification:
    ok: bool
    lines: int
    files: list[Path]
    first_seq: int | None
    last_seq: int | None
    problem: str | None = None  # "FILE:LINE: what is wrong" of the first bad line

    def summary(self) -> str:
        if not self.ok:
            return f"FAILED: {self.problem}"
        if not self.lines:
            return f"OK: no audit lines in {', '.join(map(str, self.files)) or 'no files'}"
        note = f" (lines before seq {self.first_seq} were rotated away)" if self.first_seq != 1 else ""
        return (
            f"OK: {self.lines} lines in {len(self.files)} file(s), seq {self.first_seq}..{self.last_seq}, "
            f"hash chain intact{note}"
        )


def _lines(files: list[Path]) -> Iterator[tuple[Path, int, bytes]]:
    for path in files:
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                yield path, number, raw.rstrip(b"\n")


def verify(path: Path) -> Verification:
    """Check the chain of ``path`` and its rotated files; the first broken line is named."""
    files = rotated_files(path)
    if not files:
        raise FileNotFoundError(2, "no such audit log", str(path))
    count = 0
    first_seq: int | None = None
    expected_seq: int | None = None
    previous_hash: str | None = None
    previous_where = ""

    def failed(where: str, what: str) -> Verification:
        return Verification(False, count, files, first_seq, expected_seq, f"{where}: {what}")

    for file, number, raw in _lines(files):
        where = f"{file}:{number}"
        try:
            record = json.loads(raw)
            seq, prev, stored = int(record["seq"]), str(record["prev"]), str(record["hash"])
        except (ValueError, KeyError, TypeError):
            return failed(where, "altered: not an audit line (JSON with seq, prev and hash)")
        if line_hash(record) != stored:
            return failed(where, f"altered: the content of seq {seq} does not match its hash")
        if expected_seq is None:
            first_seq = seq
            if seq == 1 and prev != GENESIS:
                return failed(where, "altered: the first line does not start the chain")
        elif seq != expected_seq:
            if seq > expected_seq:
                gap = f"seq {expected_seq}" if seq == expected_seq + 1 else f"seq {expected_seq}..{seq - 1}"
                return failed(where, f"expected seq {expected_seq}, found {seq}: {gap} removed or moved")
            return failed(where, f"expected seq {expected_seq}, found {seq}: lines reordered")
        elif prev != previous_hash:
            return failed(
                previous_where,
                f"altered: seq {seq - 1} is not the line seq {seq} (at {where}) was chained to",
            )
        count += 1
        previous_where = where
        expected_seq = seq + 1
        previous_hash = stored
    last_seq = expected_seq - 1 if expected_seq is not None else None
    return Verification(True, count, files, first_seq, last_seq)
