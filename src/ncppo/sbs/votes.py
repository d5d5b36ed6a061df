"""The vote log: one JSON line per vote, appended and fsync'd before the page moves on.

Fields of a line: prompt, prompt_index, seed, question, winner ("a", "b" or "tie"), left (the
model shown on the left, "a" or "b"), annotator, time (UTC, ISO 8601), shuffle_seed, and a / b
(the two sample folders, absolute). A later vote of the same annotator on the same (prompt_index,
seed, question) replaces the earlier one (the page's Backspace re-asks a question).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

try:  # advisory lock against a second process appending to the same file (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows: the thread lock and O_APPEND remain
    fcntl = None

WINNERS = ("a", "b", "tie")
MAX_NAME = 40
_NOT_NAME = re.compile(r"[^\w.-]+")


def sanitize_annotator(name: str) -> str:
    """A safe annotator name: NFKC-normalised, runs of characters other than letters, digits, `_`,
    `.` and `-` become `-`, no leading/trailing `-`/`.`, at most 40 characters. Raises ValueError
    when nothing is left."""
    text = unicodedata.normalize("NFKC", str(name)).strip()
    text = _NOT_NAME.sub("-", text).strip("-.")[:MAX_NAME].strip("-.")
    if not text:
        raise ValueError(f"annotator name {name!r} has no letters or digits")
    return text


class VoteLog:
    """Append-only JSONL file shared by concurrent requests (threads) and processes.

    Each vote is one `write(2)` of one whole line on an O_APPEND descriptor, under a thread lock
    and an exclusive `flock`, then `fsync`: lines never interleave, and a crash loses at most the
    vote being written. A partial last line left by an earlier crash is closed with a newline first,
    so it stays one bad line that readers skip.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        with self._locked():
            if os.fstat(self._fd).st_size:
                with open(self.path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        self._write(b"\n")

    @contextlib.contextmanager
    def _locked(self):
        with self._lock:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # one write in practice; loop only on a short write (e.g. a full disk)
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def append(self, record: dict) -> None:
        """Append `record` as one line and fsync it."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        if b"\n" in data[:-1]:  # json.dumps escapes newlines; guard against a future change
            raise ValueError("a vote record must serialise to one line")
        with self._locked():
            self._write(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class Votes:
    """Valid votes of one or more logs, the latest per (annotator, prompt_index, seed, question)."""

    votes: list[dict] = field(default_factory=list)
    lines: int = 0  # valid lines read
    superseded: int = 0  # valid lines replaced by a later vote
    bad: list[str] = field(default_factory=list)  # "file, line N: reason" of skipped lines


def _check_vote(row) -> str | None:
    """Why `row` is not a usable vote, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    for name in ("prompt", "question", "annotator"):
        if not isinstance(row.get(name), str) or not row[name]:
            return f"missing or empty {name!r}"
    if row.get("winner") not in WINNERS:
        return f"winner {row.get('winner')!r} is not one of {list(WINNERS)}"
    if row.get("left") not in ("a", "b"):
        return f"left {row.get('left')!r} is not 'a' or 'b'"
    for name in ("prompt_index", "seed"):
        if not isinstance(row.get(name), int) or isinstance(row.get(name), bool):
            return f"{name} {row.get(name)!r} is not an integer"
    return None


def read_votes(paths, *, warn: bool = True) -> Votes:
    """Read vote logs in order; skip and count bad lines (e.g. one cut short by a crash); keep the
    latest vote per (annotator, prompt_index, seed, question) in the order of first appearance."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    result = Votes()
    latest: dict[tuple, dict] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such vote file")
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    reason = _check_vote(row)
                except json.JSONDecodeError as err:
                    reason = f"not valid JSON ({err.msg})"
                if reason:
                    result.bad.append(f"{path}, line {n}: {reason}")
                    continue
                result.lines += 1
                key = (row["annotator"], row["prompt_index"], row["seed"], row["question"])
                if key in latest:
                    result.superseded += 1
                latest[key] = row
    result.votes = list(latest.values())
    if warn and result.bad:
        more = f" (and {len(result.bad) - 3} more)" if len(result.bad) > 3 else ""
        warnings.warn(f"skipped {len(result.bad)} bad vote line(s): {'; '.join(result.bad[:3])}{more}", stacklevel=2)
    return result
