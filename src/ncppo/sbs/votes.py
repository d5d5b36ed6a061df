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

from ..errors import InputError, MissingInputError

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

    Votes are written as whole lines by one `write(2)` on an O_APPEND descriptor, under a thread
    lock and an exclusive `flock`, then `fsync`'d; `append` returns only after its line is on disk.
    Group commit: the votes that arrive while one write+fsync runs go out together in the next one
    (one fsync for many concurrent annotators). Lines never interleave, and a crash loses at most
    the votes not yet acknowledged. A partial last line left by an earlier crash is closed with a
    newline first, so it stays one bad line that readers skip.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._commit = threading.Condition()  # guards _queue and _writing
        self._queue: list[_Pending] = []
        self._writing = False
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
        mine = _Pending(data)
        with self._commit:
            self._queue.append(mine)
            while not mine.done:
                if self._writing:  # another thread writes; ours goes in the next batch (or is in this one)
                    self._commit.wait()
                    continue
                batch, self._queue, self._writing = self._queue, [], True
                error = None
                self._commit.release()
                try:
                    with self._locked():
                        self._write(b"".join(p.data for p in batch))
                except BaseException as err:  # every vote of the batch fails with it (e.g. a full disk)
                    error = err
                finally:
                    self._commit.acquire()
                    for p in batch:
                        p.done, p.error = True, error
                    self._writing = False
                    self._commit.notify_all()
        if mine.error is not None:
            raise mine.error

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class _Pending:
    data: bytes
    done: bool = False
    error: BaseException | None = None


@dataclass
class Votes:
    """Valid votes of one or more logs, the latest per (annotator, prompt_index, seed, question)."""

    votes: list[dict] = field(default_factory=list)
    lines: int = 0  # valid lines read
    superseded: int = 0  # valid lines replaced by a later vote
    bad: list[str] = field(default_factory=list)  # "file, line N: reason" of skipped lines
    valid_by_file: dict[str, int] = field(default_factory=dict)  # valid lines per file read

    def bad_summary(self) -> str | None:
        """One line naming the skipped lines (the first three), or None when there were none."""
        if not self.bad:
            return None
        more = f" (and {len(self.bad) - 3} more)" if len(self.bad) > 3 else ""
        return f"skipped {len(self.bad)} bad vote line(s): {'; '.join(self.bad[:3])}{more}"


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
            raise MissingInputError(f"{path}: no such vote file")
        result.valid_by_file.setdefault(str(path), 0)
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
                result.valid_by_file[str(path)] += 1
                key = (row["annotator"], row["prompt_index"], row["seed"], row["question"])
                if key in latest:
                    result.superseded += 1
                latest[key] = row
    result.votes = list(latest.values())
    if warn and result.bad:
        warnings.warn(result.bad_summary(), stacklevel=2)
    return result


def read_vote_logs(paths) -> Votes:
    """`read_votes` for the commands: no Python warning (callers print `bad_summary()` as one line),
    and an `InputError` for a file none of whose lines is a vote (not a vote log, e.g. a README or
    an image), naming the file and its first bad line."""
    result = read_votes(paths, warn=False)
    for path, valid in result.valid_by_file.items():
        bad = [b for b in result.bad if b.startswith(f"{path}, line ")]
        if not valid and bad:
            raise InputError(f"{path} is not a vote log of `ncppo sbs serve`: none of its {len(bad)} non-empty "
                             f"line(s) is a vote ({bad[0].removeprefix(path + ', ')})")
    return result
