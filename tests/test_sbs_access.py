"""ncppo sbs serve --annotators: private links (hashed tokens), refusals that write nothing, rate and
body limits, the non-loopback rule, a port in use, and links that survive a restart of the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from ncppo.sbs.access import (RateLimiter, Tokens, hash_token, links_path, load_tokens, read_annotators,
                              tokens_path)
from ncppo.sbs.server import MAX_BODY, ServeConfig, create_app, open_session
from test_sbs_server import make_sample_folders


@pytest.fixture
def folders(tmp_path):
    return make_sample_folders(tmp_path)


def test_read_annotators(tmp_path):
    path = tmp_path / "annotators.txt"
    path.write_text("# raters of round 1\nAnn Lee\n\n  bob  \nJörg_2\n")
    assert read_annotators(path) == ["Ann-Lee", "bob", "Jörg_2"]
    for text, message in [("ann\nbob\nAnn\nann\n", "lines 1 and 4: both are annotator 'ann'"),
                          ("ann\n<>\n", "line 2: annotator name '<>' has no letters"),
                          ("# nobody\n\n", "no names")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_annotators(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_annotators(tmp_path / "missing.txt")


def _token(link: str) -> str:
    return link.split("/?t=", 1)[1]


def test_tokens_are_hashed_private_and_survive_a_restart(tmp_path):
    votes = tmp_path / "votes.jsonl"
    tokens, new = load_tokens(["ann", "bob"], votes, "http://127.0.0.1:8765")
    assert [n for n, _ in new] == ["ann", "bob"]
    assert all(link.startswith("http://127.0.0.1:8765/?t=") for _, link in new)
    ann, bob = (_token(link) for _, link in new)
    assert len(ann) >= 43 and ann != bob  # token_urlsafe(32): 256 bits
    stored = tokens_path(votes).read_text()
    assert ann not in stored and bob not in stored and hash_token(ann) in stored  # only hashes on the server side
    for path in (tokens_path(votes), links_path(votes)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert links_path(votes).read_text().splitlines() == [f"{n}\t{link}" for n, link in new]
    assert (tokens.who(ann), tokens.who(bob), tokens.who(ann + "x"), tokens.who(""), tokens.who(None)) == (
        "ann", "bob", None, None, None)

    # restart with one name more: the old links stay valid and are not made again; only cat is new
    tokens, new = load_tokens(["ann", "bob", "cat"], votes, "https://sbs.example.org/")
    assert [n for n, _ in new] == ["cat"] and new[0][1].startswith("https://sbs.example.org/?t=")
    assert (tokens.who(ann), tokens.who(bob), tokens.who(_token(new[0][1]))) == ("ann", "bob", "cat")
    assert len(links_path(votes).read_text().splitlines()) == 3
    # bob removed from the file: his link is refused; listed again, the same link works
    tokens, new = load_tokens(["ann", "cat"], votes, "http://x")
    assert new == [] and tokens.who(bob) is None and tokens.who(ann) == "ann"
    tokens, new = load_tokens(["bob"], votes, "http://x")
    assert new == [] and tokens.who(bob) == "bob" and tokens.who(ann) is None
    # a token file that is not one is refused, not overwritten
    tokens_path(votes).write_text("{}")
    with pytest.raises(ValueError, match="not a token file"):
        load_tokens(["ann"], votes, "http://x")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _token_client(folders, out, names=("ann", "bob"), clock=None, rate=5):
    from fastapi.testclient import TestClient

    secrets_ = {n: f"secret-of-{n}-{'x' * 30}" for n in names}
    tokens = Tokens({n: hash_token(t) for n, t in secrets_.items()})
    session = open_session(ServeConfig(dir_a=str(folders[0]), dir_b=str(folders[1]), out=str(out)))
    app = create_app(session, trusted_hosts=["127.0.0.1"], tokens=tokens, max_votes_per_second=rate,
                     **({"clock": clock} if clock else {}))
    return TestClient(app, base_url="http://127.0.0.1"), session, secrets_


def test_missing_wrong_and_other_annotators_tokens_are_refused_and_write_nothing(tmp_path, folders):
    out = tmp_path / "votes.jsonl"
    client, session, tok = _token_client(folders, out)
    key = session.items[0].key
    vote = dict(key=key, question="general", choice="left")
    routes = [("GET", "/", {}), ("GET", "/api/config", {}), ("GET", "/api/state", {}),
              ("GET", "/api/item", {"key": key}), ("GET", f"/img/{key}/left", {}), ("POST", "/api/vote", {})]
    for method, path, params in routes:
        body = dict(json=vote) if method == "POST" else {}
        assert client.request(method, path, params=params, **body).status_code == 401, path
        for wrong in ("nope", tok["ann"][:-1], tok["ann"] + "x", "a" * 5000):
            assert client.request(method, path, params=params | {"t": wrong}, **body).status_code == 403, path
        assert client.request(method, path, params=params, headers={"Authorization": "Bearer nope"},
                              **body).status_code == 403, path
    # the page without a link says what to do
    page = client.get("/")
    assert page.status_code == 401 and "private link" in page.text and "sbs.js" not in page.text
    # ann's token cannot act as bob, by body, query or a name that sanitises to bob
    ann = {"Authorization": f"Bearer {tok['ann']}"}
    assert client.post("/api/vote", json=vote | {"annotator": "bob"}, headers=ann).status_code == 403
    assert client.post("/api/vote", json=vote | {"annotator": " bob "}, headers=ann).status_code == 403
    assert client.get("/api/state", params={"annotator": "bob"}, headers=ann).status_code == 403
    assert client.get(f"/img/{key}/left", params={"t": tok["ann"], "annotator": "bob"}).status_code == 403
    assert out.stat().st_size == 0  # not one refused request wrote a byte

    # the right token: the name comes from it; image URLs carry the token, not a name
    assert client.get("/", params={"t": tok["ann"]}).status_code == 200
    assert client.get("/api/config", headers=ann).json()["annotator"] == "ann"
    state = client.get("/api/state", headers=ann).json()
    assert state["annotator"] == "ann" and state["item"]["left"].endswith(f"?t={tok['ann']}")
    image = client.get(state["item"]["left"])
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    item = state["item"]
    for headers, body in ((ann, {}), ({}, {"annotator": "ann"})):
        r = client.post("/api/vote", params={} if headers else {"t": tok["bob"]},
                        json=dict(key=item["key"], question=item["question"], choice="tie") | body, headers=headers)
        assert r.status_code == (200 if headers else 403)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(v["annotator"], v["question"], v["winner"]) for v in lines] == [("ann", item["question"], "tie")]
    session.log.close()


def test_votes_per_second_are_limited_per_token(tmp_path, folders):
    out, clock = tmp_path / "votes.jsonl", Clock()
    client, session, tok = _token_client(folders, out, clock=clock)
    keys = [it.key for it in session.items]

    def vote(name, i):
        return client.post("/api/vote", headers={"Authorization": f"Bearer {tok[name]}"},
                           json=dict(key=keys[i % 8], question=["general", "visual", "alignment"][i // 8],
                                     choice="left"))

    codes = [vote("ann", i).status_code for i in range(8)]
    assert codes == [200] * 5 + [429] * 3
    refused = vote("ann", 8)
    assert refused.headers["retry-after"] == "1" and "more than 5 votes a second" in refused.json()["detail"]
    assert [vote("bob", i).status_code for i in range(5)] == [200] * 5  # another token has its own budget
    clock.now = 100.999
    assert vote("ann", 9).status_code == 429
    clock.now = 101.0  # one second after ann's first vote: room for 5 more
    assert [vote("ann", i).status_code for i in range(10, 16)] == [200] * 5 + [429]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 15 and sum(v["annotator"] == "ann" for v in lines) == 10  # no refused vote was written
    session.log.close()
    # the limiter alone: a sliding window of one second
    limiter = RateLimiter(2, clock=clock)
    assert (limiter.allow("k"), limiter.allow("k")) == (0.0, 0.0)
    clock.now += 0.25
    assert limiter.allow("k") == pytest.approx(0.75) and limiter.allow("other") == 0.0


def test_request_bodies_over_the_limit_get_413_and_write_nothing(tmp_path, folders):
    out = tmp_path / "votes.jsonl"
    client, session, tok = _token_client(folders, out)
    ann = {"Authorization": f"Bearer {tok['ann']}"}
    vote = dict(key=session.items[0].key, question="general", choice="left")

    def padded(size):
        text = json.dumps(vote | {"pad": ""})
        return json.dumps(vote | {"pad": "x" * (size - len(text))}).encode()

    assert len(padded(MAX_BODY)) == MAX_BODY and len(padded(MAX_BODY + 1)) == MAX_BODY + 1
    big = client.post("/api/vote", content=padded(MAX_BODY + 1), headers=ann | {"content-type": "application/json"})
    assert big.status_code == 413 and big.headers["x-content-type-options"] == "nosniff"
    chunked = client.post("/api/vote", content=iter([padded(MAX_BODY + 1)[:3000], padded(MAX_BODY + 1)[3000:]]),
                          headers=ann | {"content-type": "application/json"})  # no Content-Length: counted
    assert chunked.status_code == 413
    huge = client.post("/api/vote", content=b"x" * 10**6, headers={"content-type": "application/json"})
    assert huge.status_code == 413  # before the token is even looked at
    assert out.stat().st_size == 0
    # exactly the limit is accepted (the extra field is ignored)
    ok = client.post("/api/vote", content=padded(MAX_BODY), headers=ann | {"content-type": "application/json"})
    assert ok.status_code == 200 and len(out.read_text().splitlines()) == 1
    session.log.close()


def _serve_args(folders, out, *extra):
    return ["sbs", "serve", str(folders[0]), str(folders[1]), "--out", str(out), *extra]


def test_cli_refuses_a_network_bind_without_annotators(tmp_path, folders, capsys):
    from ncppo.cli import main

    out = tmp_path / "votes.jsonl"
    for host in ("0.0.0.0", "192.168.1.7", "::"):
        assert main(_serve_args(folders, out, "--host", host)) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert captured.err.startswith(f"ncppo sbs serve: error: --host {host} is not loopback: give --annotators FILE")
    names = tmp_path / "names.txt"
    names.write_text("ann\n")
    assert main(_serve_args(folders, out, "--annotators", str(names), "--annotator", "x")) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(_serve_args(folders, out, "--annotators", str(tmp_path / "none.txt"))) == 2
    assert capsys.readouterr().err == f"ncppo sbs serve: error: --annotators {tmp_path / 'none.txt'}: no such file\n"
    assert not out.exists() and not tokens_path(out).exists()


def test_cli_port_in_use_is_one_error_line_before_any_link(tmp_path, folders, capsys):
    from ncppo.cli import main

    out, names = tmp_path / "votes.jsonl", tmp_path / "names.txt"
    names.write_text("ann\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for extra in ([], ["--annotators", str(names)]):
            assert main(_serve_args(folders, out, "--port", str(port), *extra)) == 2
            captured = capsys.readouterr()
            assert captured.out == ""  # no "open http://..." line, no link
            assert captured.err == (f"ncppo sbs serve: error: cannot listen on 127.0.0.1:{port}: Address already in "
                                    "use; another program (another `ncppo sbs serve`?) listens there; choose "
                                    "another --port\n")
    assert not tokens_path(out).exists() and not links_path(out).exists()  # no link made that nobody saw


def _start(folders, out, names, port):
    proc = subprocess.Popen([sys.executable, "-m", "ncppo", *_serve_args(folders, out, "--annotators", str(names),
                                                                            "--port", str(port))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    lines, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "the server ended: " + "".join(lines)
        lines.append(line)
        if "serving http://" in line:
            return proc, "".join(lines)
    proc.kill()
    raise AssertionError("no serving line: " + "".join(lines))


def _stop(proc) -> tuple[int, str]:
    """Ctrl-C the server; its exit code and the rest of its output."""
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, rest


def test_cli_private_links_vote_and_survive_a_restart(tmp_path, folders):
    import httpx

    out, names = tmp_path / "votes.jsonl", tmp_path / "names.txt"
    names.write_text("ann\nbob\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    link = re.compile(r"^  (\S+)\s+(http://\S+)$", re.M)

    proc, text = _start(folders, out, names, port)
    try:
        links = dict(link.findall(text))
        assert sorted(links) == ["ann", "bob"] and all(v.startswith(url + "/?t=") for v in links.values())
        assert "open http" not in text and f"serving {url}/ to the 2 annotators' private links only" in text
        ann = _token(links["ann"])
        assert httpx.get(url + "/").status_code == 401 and httpx.get(links["ann"]).status_code == 200
        state = httpx.get(url + "/api/state", params={"t": ann}).json()
        r = httpx.post(url + "/api/vote", params={"t": ann},
                       json=dict(key=state["item"]["key"], question="general", choice="right"))
        assert r.status_code == 200
    finally:
        code, rest = _stop(proc)
    assert (code, rest) == (0, "")  # Ctrl-C ends it quietly: no traceback

    names.write_text("ann\nbob\ncat\n")
    proc, text = _start(folders, out, names, port)
    try:
        assert sorted(dict(link.findall(text))) == ["cat"]  # only the new name gets (and shows) a link
        assert "2 annotator(s) keep their links" in text and ann not in text
        state = httpx.get(url + "/api/state", params={"t": ann}).json()  # ann's first link still works
        assert state["annotator"] == "ann" and state["item"]["answered"] == {"general": "right"}
        r = httpx.post(url + "/api/vote", headers={"Authorization": f"Bearer {ann}"},
                       json=dict(key=state["item"]["key"], question="visual", choice="tie"))
        assert r.status_code == 200
    finally:
        _stop(proc)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(v["annotator"], v["question"], v["winner"] == "tie") for v in lines] == [
        ("ann", "general", False), ("ann", "visual", True)]
    assert len(links_path(out).read_text().splitlines()) == 3
