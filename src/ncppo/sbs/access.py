"""Access control of `ncppo sbs serve --annotators FILE`: one private link per annotator.

Each name in FILE gets a random token (`secrets.token_urlsafe(32)`, 256 bits) and the link
`BASE/?t=TOKEN`. The server keeps only the token's SHA-256 in `VOTES.tokens.json` (mode 0600,
beside the vote log) and compares hashes with `hmac.compare_digest`. A plain link is printed once,
when it is made, and appended to `VOTES.links.txt` (mode 0600), the operator's copy to send out and
then keep elsewhere; the server never needs it again. Random tokens rather than tokens derived
from a server key: nothing the server stores (the vote folder, a backup of it) recreates a link.

A restart reads the hashes: existing links stay valid, names new to FILE get new links, and names
no longer in FILE are refused (their hash is kept, so listing a name again restores its old link).
A lost link: delete the name from `VOTES.tokens.json` and restart; it gets a new one.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import hmac
import json
import math
import os
import secrets
import threading
import time
from pathlib import Path

from ..errors import InputError, MissingInputError
from .votes import sanitize_annotator

TOKEN_BYTES = 32
TOKENS_FORMAT = "ncppo sbs tokens 1"


def tokens_path(votes: str | Path) -> Path:
    """VOTES.jsonl -> VOTES.tokens.json (the hashes the server checks links against)."""
    votes = Path(votes)
    return votes.with_name(votes.stem + ".tokens.json")


def links_path(votes: str | Path) -> Path:
    """VOTES.jsonl -> VOTES.links.txt (the plain links, one `NAME<TAB>URL` a line, for the operator)."""
    votes = Path(votes)
    return votes.with_name(votes.stem + ".links.txt")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_annotators(path: str | Path) -> list[str]:
    """The sanitised names of an annotators file: one a line; blank lines and `#` comments skipped.
    Refuses an empty file, a line with no usable name and two lines that sanitise to one name."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"--annotators {path}: no such file")
    seen: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            name = sanitize_annotator(line)
        except ValueError as err:
            raise InputError(f"--annotators {path}, line {n}: {err}") from None
        if name in seen:
            raise InputError(f"--annotators {path}, lines {seen[name]} and {n}: both are annotator {name!r}")
        seen[name] = n
    if not seen:
        raise InputError(f"--annotators {path}: no names (one a line)")
    return list(seen)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` (mode 0600) through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _append_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also an older file made with wider permissions
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


class Tokens:
    """The token hashes of the active annotators; `who(token)` is the name a token belongs to."""

    def __init__(self, hashes: dict[str, str]):
        self._hashes = dict(hashes)  # name -> sha256 hex of the token

    @property
    def names(self) -> list[str]:
        return list(self._hashes)

    def who(self, token: str | None) -> str | None:
        """The annotator of `token`, or None. Compares against every hash, in constant time each."""
        if not token or len(token) > 200:
            return None
        digest = hash_token(token)
        found = None
        for name, stored in self._hashes.items():
            if hmac.compare_digest(digest, stored):
                found = name
        return found


def load_tokens(annotators: list[str], votes: str | Path, base_url: str) -> tuple[Tokens, list[tuple[str, str]]]:
    """The tokens of `annotators`, making one for each name without one. Returns the tokens and the
    new (name, link) pairs, which exist nowhere but in the links file after this call."""
    path, links = tokens_path(votes), links_path(votes)
    stored: dict[str, dict] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != TOKENS_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {TOKENS_FORMAT!r}")
            stored = dict(data["annotators"])
            if not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in stored.values()):
                raise ValueError("an annotator lacks its sha256")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(f"{path}: not a token file of `ncppo sbs serve` ({err}); "
                             "move it away to make new links for everyone") from None
    new = []
    for name in annotators:
        if name not in stored:
            token = secrets.token_urlsafe(TOKEN_BYTES)
            stored[name] = dict(sha256=hash_token(token),
                                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
            new.append((name, f"{base_url.rstrip('/')}/?t={token}"))
    if new:
        # the plain links first: a crash before the hashes are saved only makes new links at the next start
        path.parent.mkdir(parents=True, exist_ok=True)
        _append_private(links, "".join(f"{name}\t{link}\n" for name, link in new))
        _write_private(path, json.dumps(dict(format=TOKENS_FORMAT, hash="sha256", annotators=stored), indent=2) + "\n")
    return Tokens({name: stored[name]["sha256"] for name in annotators}), new


class RateLimiter:
    """At most `limit` accepted events per `window` seconds per key (a sliding window)."""

    def __init__(self, limit: int, window: float = 1.0, clock=time.monotonic):
        self.limit, self.window, self.clock = int(limit), float(window), clock
        self._times: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def allow(self, key: str) -> float:
        """0 and the event is counted, or the seconds until `key` may act again (not counted)."""
        with self._lock:
            now, times = self.clock(), self._times[key]
            while times and now - times[0] >= self.window:
                times.popleft()
            if len(times) >= self.limit:
                return max(self.window - (now - times[0]), 1e-3)
            times.append(now)
            return 0.0


class BodyLimit:
    """ASGI middleware: a request whose body exceeds `max_bytes` gets 413 before the app sees it
    (by its Content-Length, or by counting a chunked body); the body is then replayed to the app."""

    def __init__(self, app, max_bytes: int, headers: dict[str, str] | None = None):
        self.app, self.max_bytes, self.headers = app, int(max_bytes), dict(headers or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send):
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def retry_after(seconds: float) -> str:
    """A Retry-After header value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))
