"""`ncppo sbs serve`: the blind A/B voting page (FastAPI app served by uvicorn).

Routes: `/` (the page), `/sbs.js`, `/sbs.css`, `/api/config`, `/api/state`, `/api/item`,
`POST /api/vote`, and `/img/{item}/{left|right}`. Images are looked up by item id and screen
side in the table built at start-up from the two folders' index files: no part of a URL is ever
joined to a file path, so `..`, absolute and percent-encoded paths match no item and get a 404.
URLs and page never name the models; the server maps "left"/"right" back to A/B itself.

With `--annotators FILE` (required unless bound to loopback) every route but the two static files
needs an annotator's token (`?t=` or `Authorization: Bearer`), which also fixes the annotator's
name; votes are rate-limited per token. Every request body is limited to `MAX_BODY` bytes (413).
See `access` for the tokens.
"""

# No `from __future__ import annotations` here: FastAPI reads the route annotations at run time, and the
# request model is local to create_app (so FastAPI stays an optional import).
import contextlib
import datetime as dt
import errno
import html
import socket
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from ..configs import ConfigError, option
from ..errors import InputError, RunError
from .access import BodyLimit, RateLimiter, Tokens, links_path, load_tokens, read_annotators, retry_after
from .items import QUESTIONS, Item, annotator_order, item_key, left_side, load_items
from .votes import VoteLog, read_vote_logs, sanitize_annotator

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
MAX_BODY = 4096  # bytes of a request body; a vote is about 100
STATIC = {"sbs.js": "text/javascript", "sbs.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # no caching: a restart with another --shuffle-seed must never show a stale image on a side
    "Cache-Control": "no-store",
}


@dataclass
class ServeConfig:
    dir_a: str = field(metadata={"help": "sample folder of model A (from `ncppo sample`)", "cli": False})
    dir_b: str = field(metadata={"help": "sample folder of model B, same prompts and seeds", "cli": False})
    out: str = field(metadata={"help": "vote log (JSONL) to append to; an existing one is resumed"})
    annotator: str | None = option(None, "annotator name for every vote of this server; none = each person "
                                         "types a name on the page (several annotators can share one server)")
    annotators: str | None = option(None, "file of annotator names, one a line: each gets a private link (a "
                                          "secret token) and can vote only under their name; required when "
                                          "--host is not loopback", metavar="FILE")
    questions: list[str] = option(list(QUESTIONS), f"questions asked per item, in order, from {', '.join(QUESTIONS)}")
    host: str = option("127.0.0.1", "address to bind; anything but 127.0.0.1/localhost/::1 needs --annotators "
                                    "(and a TLS reverse proxy in front, see docs/sbs.md)")
    port: int = option(8765, "port to listen on")
    public_url: str | None = option(None, "with --annotators: the address annotators open, used in their links "
                                          "(e.g. https://sbs.example.org behind a TLS proxy); none = "
                                          "http://HOST:PORT", metavar="URL")
    max_votes_per_second: int = option(5, "with --annotators: votes one link may cast per second (beyond: HTTP "
                                          "429, nothing saved); 0 = no limit", metavar="N")
    shuffle_seed: int = option(0, "seed of each annotator's item order and left/right layout (recorded in every vote)")

    def validate(self) -> None:
        unknown = [q for q in self.questions if q not in QUESTIONS]
        if unknown or not self.questions:
            raise ConfigError(f"--questions: unknown {unknown}; choose from {list(QUESTIONS)}")
        if len(set(self.questions)) != len(self.questions):
            raise ConfigError(f"--questions: repeated in {self.questions}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.annotator is not None:
            try:
                sanitize_annotator(self.annotator)
            except ValueError as err:
                raise ConfigError(f"--annotator: {err}") from None
        if self.host not in LOOPBACK and not self.annotators:
            raise ConfigError(f"--host {self.host} is not loopback: give --annotators FILE (a private link per "
                              "annotator), or keep 127.0.0.1 and use an SSH tunnel")
        if self.annotator is not None and self.annotators:
            raise ConfigError("--annotator and --annotators exclude each other (with --annotators each link "
                              "names its annotator)")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(f"--public-url must start with http:// or https://, got {self.public_url!r}")
        if self.max_votes_per_second < 0:
            raise ConfigError(f"--max-votes-per-second must be >= 0, got {self.max_votes_per_second}")


def manifest_path(votes: str | Path) -> Path:
    """Where `serve` writes its manifest: VOTES.jsonl -> VOTES.manifest.json."""
    votes = Path(votes)
    return votes.with_name(votes.stem + ".manifest.json")


class VotingSession:
    """The items, each annotator's answers and the log; thread-safe (uvicorn runs routes in a pool)."""

    def __init__(self, items: list[Item], log: VoteLog, *, questions, dir_a, dir_b, shuffle_seed: int = 0,
                 annotator: str | None = None, votes: list[dict] = ()):
        self.items, self.log, self.questions = items, log, list(questions)
        self.dir_a, self.dir_b = str(Path(dir_a).resolve()), str(Path(dir_b).resolve())
        self.shuffle_seed = int(shuffle_seed)
        self.annotator = sanitize_annotator(annotator) if annotator else None
        self.skipped: str | None = None  # the log's bad lines, one line (set by open_session)
        self.by_key = {it.key: it for it in items}
        self._answers: dict[str, dict[tuple[str, str], str]] = defaultdict(dict)
        self._orders: dict[str, list[Item]] = {}
        self._lock = threading.Lock()
        for v in votes:
            self._check_resumed(v)
            if v["question"] in self.questions:
                self._answers[v["annotator"]][(item_key(v["prompt_index"], v["seed"]), v["question"])] = v["winner"]

    def _check_resumed(self, v: dict) -> None:
        if (v.get("a"), v.get("b")) != (self.dir_a, self.dir_b):
            raise ValueError(f"{self.log.path} holds votes on {v.get('a')} (A) vs {v.get('b')} (B), not on "
                             f"{self.dir_a} vs {self.dir_b}; use another --out")
        item = self.by_key.get(item_key(v.get("prompt_index", -1), v["seed"]))
        if item is None or item.prompt != v["prompt"]:
            raise ValueError(f"{self.log.path} holds a vote on prompt {v.get('prompt_index')} seed {v['seed']} "
                             f"({v['prompt']!r}), which the sample folders do not hold; use another --out")

    def who(self, name: str | None) -> str:
        """The annotator of a request: the server's fixed one, else the sanitised name (ValueError if empty)."""
        if self.annotator:
            return self.annotator
        return sanitize_annotator(name or "")

    def _order(self, annotator: str) -> list[Item]:
        if annotator not in self._orders:
            self._orders[annotator] = annotator_order(self.items, annotator, self.shuffle_seed)
        return self._orders[annotator]

    def state(self, annotator: str, key: str | None = None, image_query: str | None = None) -> dict:
        """Progress and the item to show: `key`, or the annotator's first unfinished item (None when done).
        `image_query` is the query of the image URLs (default `annotator=NAME`)."""
        with self._lock:
            answers = dict(self._answers.get(annotator, {}))
            order = self._order(annotator)
        finished = [all((it.key, q) in answers for q in self.questions) for it in order]
        if key is None:
            item = next((it for it, done in zip(order, finished) if not done), None)
        else:
            item = self.by_key[key]
        return dict(annotator=annotator, total=len(order), done=sum(finished),
                    item=None if item is None else self._view(item, annotator, answers, image_query))

    def _view(self, item: Item, annotator: str, answers: dict, image_query: str | None = None) -> dict:
        left = left_side(item.key, annotator, self.shuffle_seed)
        side = {"tie": "tie", left: "left", _other(left): "right"}
        answered = {q: side[answers[(item.key, q)]] for q in self.questions if (item.key, q) in answers}
        query = image_query or f"annotator={quote(annotator, safe='')}"  # no %-formatting: quote() writes "%C3"
        return dict(key=item.key, prompt=item.prompt, left=f"/img/{item.key}/left?{query}",
                    right=f"/img/{item.key}/right?{query}", answered=answered,
                    question=next((q for q in self.questions if q not in answered), None))

    def image(self, annotator: str, key: str, position: str) -> Path:
        """The file shown at `position` ("left"/"right") of item `key`; KeyError for an unknown item."""
        item = self.by_key[key]
        left = left_side(item.key, annotator, self.shuffle_seed)
        model = left if position == "left" else _other(left)
        return item.file_a if model == "a" else item.file_b

    def vote(self, annotator: str, key: str, question: str, choice: str) -> dict:
        """Record `choice` ("left", "right", "tie") as one appended line, then update the answers."""
        item = self.by_key[key]
        if question not in self.questions:
            raise ValueError(f"unknown question {question!r}")
        left = left_side(item.key, annotator, self.shuffle_seed)
        winner = {"tie": "tie", "left": left, "right": _other(left)}[choice]
        record = dict(prompt=item.prompt, prompt_index=item.prompt_index, seed=item.seed, question=question,
                      winner=winner, left=left, annotator=annotator,
                      time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                      shuffle_seed=self.shuffle_seed, a=self.dir_a, b=self.dir_b)
        self.log.append(record)  # on disk before the page is told, so the page never shows an unsaved vote
        with self._lock:
            self._answers[annotator][(key, question)] = winner
        return record


def _other(side: str) -> str:
    return "b" if side == "a" else "a"


def _static(name: str) -> str:
    return resources.files("ncppo.sbs").joinpath("static", name).read_text(encoding="utf-8")


NO_LINK_PAGE = ("<!doctype html><meta charset='utf-8'><title>ncppo side-by-side</title>"
                "<p>{}</p>")


def create_app(session: VotingSession, *, trusted_hosts: list[str] | None = None, tokens: Tokens | None = None,
               max_votes_per_second: int = 5, clock=time.monotonic):
    """The FastAPI app over a `VotingSession`; `trusted_hosts` limits the Host header (DNS rebinding).

    With `tokens`, the page, the API and the images need a token (`?t=` or `Authorization: Bearer`):
    missing 401, unknown or revoked 403; the token names the annotator (a request naming another is
    403), and one token may cast `max_votes_per_second` votes a second (429 beyond; 0 = no limit)."""
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, Response
    from pydantic import BaseModel
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="ncppo sbs", docs_url=None, redoc_url=None, openapi_url=None)
    if trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY, headers=SECURITY_HEADERS)  # outermost: before any parsing
    pages = {"index.html": _static("index.html"), **{name: _static(name) for name in STATIC}}
    limited = tokens is not None and max_votes_per_second > 0
    limiter = RateLimiter(max_votes_per_second, clock=clock) if limited else None

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    def token_of(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return request.query_params.get("t")

    def identity(request: Request) -> tuple[str, str] | None:
        """(annotator, token) of a request when tokens are required, else None; 401/403 otherwise."""
        if tokens is None:
            return None
        token = token_of(request)
        if not token:
            raise HTTPException(401, "this page needs your private link (…/?t=…)",
                                headers={"WWW-Authenticate": "Bearer"})
        name = tokens.who(token)
        if name is None:
            raise HTTPException(403, "this link is not valid (a wrong or withdrawn token)")
        return name, token

    def who(name: str | None, ident: tuple[str, str] | None) -> str:
        if ident is not None:
            if name is not None and name != ident[0] and _sanitized(name) != ident[0]:
                raise HTTPException(403, f"this link votes as {ident[0]}, not as {name!r}")
            return ident[0]
        try:
            return session.who(name)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None

    def image_query(ident) -> str | None:
        return None if ident is None else f"t={ident[1]}"

    class Vote(BaseModel):
        annotator: str | None = None
        key: str
        question: str
        choice: Literal["left", "right", "tie"]

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        try:
            identity(request)
        except HTTPException as err:
            return HTMLResponse(NO_LINK_PAGE.format(html.escape(err.detail)), status_code=err.status_code,
                                headers=err.headers)
        return HTMLResponse(pages["index.html"])

    @app.get("/sbs.js")
    def script():
        return Response(pages["sbs.js"], media_type=STATIC["sbs.js"])

    @app.get("/sbs.css")
    def style():
        return Response(pages["sbs.css"], media_type=STATIC["sbs.css"])

    @app.get("/api/config")
    def config(ident=Depends(identity)):
        return dict(questions=[dict(id=q, text=QUESTIONS[q]) for q in session.questions],
                    total=len(session.items), annotator=ident[0] if ident else session.annotator)

    @app.get("/api/state")
    def state(annotator: str | None = None, ident=Depends(identity)):
        return session.state(who(annotator, ident), image_query=image_query(ident))

    @app.get("/api/item")
    def item(key: str, annotator: str | None = None, ident=Depends(identity)):
        name = who(annotator, ident)
        if key not in session.by_key:
            raise HTTPException(404, "no such item")
        return session.state(name, key, image_query=image_query(ident))

    @app.post("/api/vote")
    def vote(body: Vote, ident=Depends(identity)):
        name = who(body.annotator, ident)
        if body.key not in session.by_key:
            raise HTTPException(404, "no such item")
        if body.question not in session.questions:
            raise HTTPException(422, f"unknown question {body.question!r}")
        if limiter is not None and (wait := limiter.allow(name)):
            raise HTTPException(429, f"more than {max_votes_per_second} votes a second; try again in {wait:.2f} s",
                                headers={"Retry-After": retry_after(wait)})
        session.vote(name, body.key, body.question, body.choice)
        return session.state(name, image_query=image_query(ident))

    @app.get("/img/{key}/{position}")
    def image(key: str, position: Literal["left", "right"], annotator: str | None = Query(None),
              ident=Depends(identity)):
        name = who(annotator, ident)
        if key not in session.by_key:
            raise HTTPException(404, "no such image")
        return FileResponse(session.image(name, key, position))

    return app


def _sanitized(name: str) -> str | None:
    try:
        return sanitize_annotator(name)
    except ValueError:
        return None


def open_session(config: ServeConfig) -> VotingSession:
    """Load and check the items and the existing votes of `config.out`; open the log for appending.
    The bad lines of the log (e.g. one cut by a crash) are in `session.skipped`."""
    items = load_items(config.dir_a, config.dir_b)
    out = Path(config.out)
    read = read_vote_logs(out) if out.is_file() else None  # refuses a file that is not a vote log
    log = VoteLog(out)
    try:
        session = VotingSession(items, log, questions=config.questions, dir_a=config.dir_a, dir_b=config.dir_b,
                                shuffle_seed=config.shuffle_seed, annotator=config.annotator,
                                votes=read.votes if read else [])
    except Exception:
        log.close()
        raise
    session.skipped = read.bad_summary() if read else None
    return session


def trusted_hosts(host: str) -> list[str] | None:
    """The Host headers a page bound to `host` accepts: the loopback names (IPv6 as the browser
    writes it, "[::1]") when bound to loopback, else any (None)."""
    return [*LOOPBACK, "[::1]"] if host in LOOPBACK else None


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); an `InputError` naming them when that fails (port in use,
    no such address, no permission), so `serve` fails in one line before it prints any link."""
    # proto=IPPROTO_TCP, not 0 (socket.create_server): asyncio sets TCP_NODELAY only on such sockets, and
    # without it Nagle's algorithm and delayed ACKs hold each response ~40 ms
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        return sock
    except OSError as err:
        sock.close()
        hint = ("another program (another `ncppo sbs serve`?) listens there; choose another --port"
                if err.errno == errno.EADDRINUSE else "check --host and --port")
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror or err}; {hint}") from None


def _url_host(host: str) -> str:
    """`host` as written in a URL; the machine's name for a wildcard address (0.0.0.0, ::)."""
    if host in WILDCARD:
        host = socket.gethostname()
    return f"[{host}]" if ":" in host else host


def run_serve(config: ServeConfig) -> None:
    """Serve the voting page until interrupted (Ctrl-C)."""
    import uvicorn

    from ..manifest import write_manifest

    names = read_annotators(config.annotators) if config.annotators else None
    session = open_session(config)
    try:
        sock = bind_socket(config.host, config.port)  # before any link is printed or token made
        try:
            port = sock.getsockname()[1]
            local = f"http://{_url_host(config.host)}:{port}/"
            tokens, new_links = load_tokens(names, config.out, config.public_url or local) if names else (None, [])
            write_manifest(manifest_path(config.out), command="sbs serve", config=config, items=len(session.items),
                           dir_a=session.dir_a, dir_b=session.dir_b, annotators=names)
            app = create_app(session, trusted_hosts=trusted_hosts(config.host), tokens=tokens,
                             max_votes_per_second=config.max_votes_per_second)
            _announce(config, session, local, names, new_links)
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down and re-raises it (uvicorn.run swallows it)
                pass
            if not server.started:
                raise RunError(f"the server on {config.host}:{port} did not start")
        finally:
            sock.close()
    finally:
        session.log.close()


def _announce(config: ServeConfig, session: VotingSession, local: str, names, new_links) -> None:
    print(f"ncppo sbs: {len(session.items)} items x {len(session.questions)} question(s); votes -> {config.out}")
    if session.skipped:
        print(f"ncppo sbs serve: warning: {session.skipped}", file=sys.stderr)
    stop = "Ctrl-C to stop; every vote is already saved"
    if names is None:
        print(f"ncppo sbs: open {local}  ({stop})", flush=True)
        return
    links = links_path(config.out)
    if new_links:
        print(f"ncppo sbs: private links of {len(new_links)} new annotator(s), shown only now and appended to "
              f"{links} (mode 0600; send each its own, keep the file private):")
        width = max(len(name) for name, _ in new_links)
        for name, link in new_links:
            print(f"  {name:<{width}}  {link}")
    if len(names) > len(new_links):
        print(f"ncppo sbs: {len(names) - len(new_links)} annotator(s) keep their links (in {links})")
    if config.host not in LOOPBACK and not (config.public_url or "").startswith("https://"):
        print(f"ncppo sbs: warning: plain HTTP on {config.host}: links and votes cross the network unencrypted; "
              "put a TLS reverse proxy in front and give --public-url https://... (docs/sbs.md)", file=sys.stderr)
    print(f"ncppo sbs: serving {local} to the {len(names)} annotators' private links only ({stop})", flush=True)


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0):
    """Serve `app` with uvicorn in a background thread on `host` (port 0 = a free one); yields the
    base URL. For tests and notebooks."""
    import uvicorn

    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the sbs server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{_url_host(host)}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
