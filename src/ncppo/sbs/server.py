"""`ncppo sbs serve`: the blind A/B voting page (FastAPI app served by uvicorn).

Routes: `/` (the page), `/sbs.js`, `/sbs.css`, `/api/config`, `/api/state`, `/api/item`,
`POST /api/vote`, and `/img/{item}/{left|right}`. Images are looked up by item id and screen
side in the table built at start-up from the two folders' index files: no part of a URL is ever
joined to a file path, so `..`, absolute and percent-encoded paths match no item and get a 404.
URLs and page never name the models; the server maps "left"/"right" back to A/B itself.
"""

# No `from __future__ import annotations` here: FastAPI reads the route annotations at run time, and the
# request model is local to create_app (so FastAPI stays an optional import).
import contextlib
import datetime as dt
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from ..configs import ConfigError, option
from .items import QUESTIONS, Item, annotator_order, item_key, left_side, load_items
from .votes import VoteLog, read_votes, sanitize_annotator

LOOPBACK = ("127.0.0.1", "localhost", "::1")
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
    questions: list[str] = option(list(QUESTIONS), f"questions asked per item, in order, from {', '.join(QUESTIONS)}")
    host: str = option("127.0.0.1", "address to bind; anything but 127.0.0.1/localhost lets others on the "
                                    "network see the images and vote")
    port: int = option(8765, "port to listen on")
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

    def state(self, annotator: str, key: str | None = None) -> dict:
        """Progress and the item to show: `key`, or the annotator's first unfinished item (None when done)."""
        with self._lock:
            answers = dict(self._answers.get(annotator, {}))
            order = self._order(annotator)
        finished = [all((it.key, q) in answers for q in self.questions) for it in order]
        if key is None:
            item = next((it for it, done in zip(order, finished) if not done), None)
        else:
            item = self.by_key[key]
        return dict(annotator=annotator, total=len(order), done=sum(finished),
                    item=None if item is None else self._view(item, annotator, answers))

    def _view(self, item: Item, annotator: str, answers: dict) -> dict:
        left = left_side(item.key, annotator, self.shuffle_seed)
        side = {"tie": "tie", left: "left", _other(left): "right"}
        answered = {q: side[answers[(item.key, q)]] for q in self.questions if (item.key, q) in answers}
        url = f"/img/{item.key}/%s?annotator={quote(annotator, safe='')}"
        return dict(key=item.key, prompt=item.prompt, left=url % "left", right=url % "right", answered=answered,
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


def create_app(session: VotingSession, *, trusted_hosts: list[str] | None = None):
    """The FastAPI app over a `VotingSession`; `trusted_hosts` limits the Host header (DNS rebinding)."""
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, Response
    from pydantic import BaseModel
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="ncppo sbs", docs_url=None, redoc_url=None, openapi_url=None)
    if trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts)
    pages = {"index.html": _static("index.html"), **{name: _static(name) for name in STATIC}}

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    def who(name: str | None) -> str:
        try:
            return session.who(name)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None

    class Vote(BaseModel):
        annotator: str | None = None
        key: str
        question: str
        choice: Literal["left", "right", "tie"]

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(pages["index.html"])

    @app.get("/sbs.js")
    def script():
        return Response(pages["sbs.js"], media_type=STATIC["sbs.js"])

    @app.get("/sbs.css")
    def style():
        return Response(pages["sbs.css"], media_type=STATIC["sbs.css"])

    @app.get("/api/config")
    def config():
        return dict(questions=[dict(id=q, text=QUESTIONS[q]) for q in session.questions],
                    total=len(session.items), annotator=session.annotator)

    @app.get("/api/state")
    def state(annotator: str | None = None):
        return session.state(who(annotator))

    @app.get("/api/item")
    def item(key: str, annotator: str | None = None):
        if key not in session.by_key:
            raise HTTPException(404, "no such item")
        return session.state(who(annotator), key)

    @app.post("/api/vote")
    def vote(body: Vote):
        name = who(body.annotator)
        if body.key not in session.by_key:
            raise HTTPException(404, "no such item")
        if body.question not in session.questions:
            raise HTTPException(422, f"unknown question {body.question!r}")
        session.vote(name, body.key, body.question, body.choice)
        return session.state(name)

    @app.get("/img/{key}/{position}")
    def image(key: str, position: Literal["left", "right"], annotator: str | None = Query(None)):
        name = who(annotator)
        if key not in session.by_key:
            raise HTTPException(404, "no such image")
        return FileResponse(session.image(name, key, position))

    return app


def open_session(config: ServeConfig) -> VotingSession:
    """Load and check the items and the existing votes of `config.out`; open the log for appending."""
    items = load_items(config.dir_a, config.dir_b)
    out = Path(config.out)
    votes = read_votes(out).votes if out.is_file() else []
    log = VoteLog(out)
    try:
        return VotingSession(items, log, questions=config.questions, dir_a=config.dir_a, dir_b=config.dir_b,
                             shuffle_seed=config.shuffle_seed, annotator=config.annotator, votes=votes)
    except Exception:
        log.close()
        raise


def trusted_hosts(host: str) -> list[str] | None:
    """The Host headers a page bound to `host` accepts: the loopback names (IPv6 as the browser
    writes it, "[::1]") when bound to loopback, else any (None)."""
    return [*LOOPBACK, "[::1]"] if host in LOOPBACK else None


def run_serve(config: ServeConfig) -> None:
    """Serve the voting page until interrupted (Ctrl-C)."""
    import uvicorn

    from ..manifest import write_manifest

    session = open_session(config)
    write_manifest(manifest_path(config.out), command="sbs serve", config=config, items=len(session.items),
                   dir_a=session.dir_a, dir_b=session.dir_b)
    app = create_app(session, trusted_hosts=trusted_hosts(config.host))
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"ncppo sbs: {len(session.items)} items x {len(session.questions)} question(s); votes -> {config.out}")
    if config.host not in LOOPBACK:
        print(f"ncppo sbs: warning: bound to {config.host}: anyone who can reach it can see the images and vote")
    print(f"ncppo sbs: open http://{host}:{config.port}/  (Ctrl-C to stop; every vote is already saved)")
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        session.log.close()


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0):
    """Serve `app` with uvicorn in a background thread on `host` (port 0 = a free one); yields the
    base URL. For tests and notebooks."""
    import socket
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the sbs server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
