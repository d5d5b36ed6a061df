"""ncppo sbs serve: pairing, blind layout, resume, annotator names, path traversal, crash safety."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ncppo.evaluate.sample import INDEX_FILE, image_name
from ncppo.sbs.items import annotator_order, left_side, load_items
from ncppo.sbs.server import ServeConfig, VotingSession, create_app, open_session, running_server
from ncppo.sbs.votes import read_votes, sanitize_annotator

PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green triangle on a gray background", "a yellow circle on a black background"]


def make_sample_folders(root: Path, prompts=PROMPTS, seeds=(0, 1)) -> tuple[Path, Path]:
    """Two folders in `ncppo sample`'s layout (images/*.png + index.jsonl) of toy-world renders:
    A flawless, B blurred, so every image differs from its counterpart."""
    from ncppo.toy.world import render_prompt

    folders = []
    for name, flaws in (("model-a", ()), ("model-b", ("blur", "offcentre"))):
        folder = root / name
        (folder / "images").mkdir(parents=True)
        rows = []
        for i, prompt in enumerate(prompts):
            for s in seeds:
                render_prompt(prompt, s, flaws).resize((128, 128)).save(folder / image_name(i, s))
                rows.append(dict(prompt=prompt, prompt_index=i, seed=s, file=image_name(i, s), model=name,
                                 settings={}))
        (folder / INDEX_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        folders.append(folder)
    return folders[0], folders[1]


@pytest.fixture
def folders(tmp_path):
    return make_sample_folders(tmp_path)


def session_for(folders, out, **kw) -> VotingSession:
    return open_session(ServeConfig(dir_a=str(folders[0]), dir_b=str(folders[1]), out=str(out), **kw))


def test_items_pair_folders_and_refuse_mismatch_and_files_outside(tmp_path, folders):
    items = load_items(*folders)
    assert [(it.prompt_index, it.seed) for it in items] == [(i, s) for i in range(4) for s in (0, 1)]
    assert items[3].file_a == (folders[0] / "images/00001_1.png").resolve()
    # B lacks an image A has: refused, naming it
    index_b = folders[1] / INDEX_FILE
    rows = index_b.read_text().splitlines()
    index_b.write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(ValueError, match="prompt 3 seed 1 .* is in .*model-a but not in"):
        load_items(*folders)
    # an index row naming a file outside its folder is refused, relative or absolute
    secret = tmp_path / "secret.png"
    secret.write_bytes((folders[0] / "images/00000_0.png").read_bytes())
    for bad in ("../../secret.png", str(secret)):
        row = json.loads(rows[-1]) | {"file": bad}
        index_b.write_text("\n".join(rows[:-1] + [json.dumps(row)]) + "\n")
        with pytest.raises(ValueError, match="lies outside"):
            load_items(*folders)


def test_layout_and_order_are_seeded_per_annotator():
    from ncppo.sbs.items import Item

    items = [Item(f"{i}-0", f"p{i}", i, 0, Path("a"), Path("b")) for i in range(40)]
    ann, bob = annotator_order(items, "ann", 0), annotator_order(items, "bob", 0)
    assert ann == annotator_order(items, "ann", 0)  # a resumed session sees the same order
    assert ann != bob and ann != annotator_order(items, "ann", 1) and sorted(ann, key=lambda i: i.prompt_index) == items
    sides = [left_side(it.key, "ann", 0) for it in items]
    assert 10 < sides.count("a") < 30  # both layouts occur
    assert sides != [left_side(it.key, "bob", 0) for it in items]


def test_sanitize_annotator():
    assert sanitize_annotator("  Ann Lee ") == "Ann-Lee"
    assert sanitize_annotator("<script>alert(1)</script>") == "script-alert-1-script"
    assert sanitize_annotator("../../etc/passwd") == "etc-passwd"
    assert sanitize_annotator("Jörg_2") == "Jörg_2"
    assert sanitize_annotator("x" * 100) == "x" * 40
    for bad in ("", "   ", "../..", "<>"):
        with pytest.raises(ValueError, match="no letters or digits"):
            sanitize_annotator(bad)


def _client(session):
    from fastapi.testclient import TestClient

    return TestClient(create_app(session, trusted_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1")


def test_vote_records_blind_layout_and_resumes(tmp_path, folders):
    out = tmp_path / "votes.jsonl"
    session = session_for(folders, out, questions=["general", "visual"], shuffle_seed=7)
    client = _client(session)
    page = client.get("/").text + client.get("/sbs.js").text + json.dumps(client.get("/api/config").json())
    assert "model-a" not in page and "model-b" not in page  # blind
    state = client.get("/api/state", params={"annotator": "Ann Lee"}).json()
    assert state["annotator"] == "Ann-Lee" and (state["done"], state["total"]) == (0, 8)
    assert "model-" not in json.dumps(state)
    first = state["item"]
    assert first["key"] == annotator_order(session.items, "Ann-Lee", 7)[0].key and first["question"] == "general"
    files = {it.key: it for it in session.items}[first["key"]]
    left_bytes = client.get(first["left"]).content
    left_model = "a" if left_bytes == files.file_a.read_bytes() else "b"
    assert left_bytes == (files.file_a if left_model == "a" else files.file_b).read_bytes()
    assert client.get(first["right"]).content == (files.file_b if left_model == "a" else files.file_a).read_bytes()

    state = client.post("/api/vote", json=dict(annotator="Ann Lee", key=first["key"], question="general",
                                               choice="left")).json()
    assert state["item"]["key"] == first["key"] and state["item"]["question"] == "visual"
    assert state["item"]["answered"] == {"general": "left"} and state["done"] == 0
    state = client.post("/api/vote", json=dict(annotator="Ann Lee", key=first["key"], question="visual",
                                               choice="tie")).json()
    assert state["done"] == 1 and state["item"]["key"] == annotator_order(session.items, "Ann-Lee", 7)[1].key
    second = state["item"]["key"]
    client.post("/api/vote", json=dict(annotator="Ann Lee", key=second, question="general", choice="right"))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(v["question"], v["winner"]) for v in lines] == [
        ("general", left_model), ("visual", "tie"), ("general", left_side(second, "Ann-Lee", 7) == "a" and "b" or "a")]
    v = lines[0]
    assert {k: v[k] for k in ("prompt", "prompt_index", "seed", "left", "annotator", "shuffle_seed")} == dict(
        prompt=files.prompt, prompt_index=files.prompt_index, seed=files.seed, left=left_model, annotator="Ann-Lee",
        shuffle_seed=7)
    assert v["a"] == str(folders[0].resolve()) and v["b"] == str(folders[1].resolve()) and v["time"].endswith("+00:00")
    # bad requests: unknown item or question, bad choice, no name
    assert client.post("/api/vote", json=dict(annotator="x", key="99-0", question="general", choice="left")).status_code == 404
    assert client.post("/api/vote", json=dict(annotator="x", key=second, question="style", choice="left")).status_code == 422
    assert client.post("/api/vote", json=dict(annotator="x", key=second, question="general", choice="a")).status_code == 422
    assert client.get("/api/state", params={"annotator": "<>"}).status_code == 400
    # a cross-site form (text/plain, no CORS preflight) cannot vote: only JSON bodies are read
    form = json.dumps(dict(annotator="x", key=second, question="general", choice="left"))
    assert client.post("/api/vote", content=form, headers={"content-type": "text/plain"}).status_code == 422
    assert len(out.read_text().splitlines()) == 3
    # another Host header (DNS rebinding) is refused
    assert client.get("/api/config", headers={"host": "evil.example"}).status_code == 400
    session.log.close()

    # restart: Ann resumes on her half-done second item at the unanswered question; Bob starts his own order
    session = session_for(folders, out, questions=["general", "visual"], shuffle_seed=7)
    state = session.state("Ann-Lee")
    assert state["done"] == 1 and state["item"]["key"] == second and state["item"]["question"] == "visual"
    assert session.state("Bob")["item"]["key"] == annotator_order(session.items, "Bob", 7)[0].key
    session.log.close()
    # the same log on the folders swapped (A <-> B) is refused: its "a" would mean the other model
    with pytest.raises(ValueError, match="holds votes on .*model-a.* vs .*model-b"):
        session_for(folders[::-1], out)


def test_fixed_annotator_overrides_the_page(tmp_path, folders):
    session = session_for(folders, tmp_path / "v.jsonl", annotator="rater 1")
    client = _client(session)
    assert client.get("/api/config").json()["annotator"] == "rater-1"
    assert client.get("/api/state", params={"annotator": "someone"}).json()["annotator"] == "rater-1"
    session.log.close()


TRAVERSALS = [
    "/img/../../../../etc/passwd/left", "/img/..%2f..%2f..%2f..%2fetc%2fpasswd/left",
    "/img/%2e%2e%2f%2e%2e%2fetc%2fpasswd/left", "/img/%252e%252e%252fetc%252fpasswd/left",
    "/img/%2fetc%2fpasswd/left", "/img//etc/passwd/left", "/img/..%5c..%5cetc%5cpasswd/left",
    "/img/0-0/..%2f..%2findex.jsonl", "/img/0-0/%2e%2e%2f%2e%2e%2fmodel-a%2findex.jsonl",
    "/img/0-0/left/../../index.jsonl", "/img/0-0/../../model-a/images/00000_0.png",
    "/images/00000_0.png", "/model-a/images/00000_0.png", "/model-a/index.jsonl", "/static/../index.jsonl",
    "/sbs.js/../../model-a/index.jsonl", "/..%2fmodel-a%2findex.jsonl", "/img/0-0/right%00.png",
    "/img/%c0%ae%c0%ae%2fetc%2fpasswd/left", "/img/0-0/..;/left",
]


def test_path_traversal_gets_4xx_and_no_bytes(tmp_path, folders):
    session = session_for(folders, tmp_path / "v.jsonl")
    with running_server(create_app(session)) as url:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)

        def get(path):
            conn.request("GET", path)  # sent as written: http.client normalises nothing
            response = conn.getresponse()
            return response.status, response.read()

        status, body = get("/img/0-0/left?annotator=x")  # the check can fail: a real image is served
        assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
        secrets = [b"\x89PNG", b"root:", b"prompt_index"]
        for path in TRAVERSALS:
            status, body = get(path + ("&" if "?" in path else "?") + "annotator=x")
            assert 400 <= status < 500, (path, status)
            assert not any(s in body for s in secrets), path
        conn.close()
    session.log.close()


def test_concurrent_votes_over_http_are_whole_lines(tmp_path, folders):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    out = tmp_path / "v.jsonl"
    session = session_for(folders, out)
    keys = [it.key for it in session.items]
    with running_server(create_app(session)) as url:
        def annotate(name):
            with httpx.Client(base_url=url) as http:
                for key in keys:
                    for q in ("general", "visual", "alignment"):
                        r = http.post("/api/vote", json=dict(annotator=name, key=key, question=q, choice="tie"))
                        assert r.status_code == 200
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(annotate, [f"rater{i}" for i in range(4)]))
    session.log.close()
    lines = out.read_text().splitlines()
    assert len(lines) == 4 * len(keys) * 3 and all(json.loads(x)["winner"] == "tie" for x in lines)
    assert read_votes(out).bad == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_on_loopback_and_a_kill_keeps_every_acknowledged_vote(tmp_path, folders):
    import httpx

    out, port = tmp_path / "votes.jsonl", _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ncppo", "sbs", "serve", str(folders[0]), str(folders[1]),
                             "--out", str(out), "--port", str(port), "--annotator", "ann"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/api/config", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.2)
        acknowledged = 0
        state = httpx.get(url + "/api/state").json()
        for _ in range(5):
            item = state["item"]
            state = httpx.post(url + "/api/vote", json=dict(key=item["key"], question=item["question"],
                                                            choice="left")).json()
            acknowledged += 1
        proc.send_signal(signal.SIGKILL)  # a crash: no shutdown, no flush
        proc.wait(10)
        text = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert f"open http://127.0.0.1:{port}/" in text
    votes = read_votes(out)
    assert len(votes.votes) == acknowledged and votes.bad == []
    assert (tmp_path / "votes.manifest.json").is_file()


def test_ipv6_loopback_is_loopback(tmp_path, folders):
    from fastapi.testclient import TestClient

    from ncppo.sbs.server import LOOPBACK, trusted_hosts

    assert "::1" in LOOPBACK and trusted_hosts("0.0.0.0") is None
    assert trusted_hosts("::1") == ["127.0.0.1", "localhost", "::1", "[::1]"]
    session = session_for(folders, tmp_path / "votes.jsonl")
    client = TestClient(create_app(session, trusted_hosts=trusted_hosts("::1")), base_url="http://[::1]:8765")
    assert client.get("/").status_code == 200  # the Host header a browser sends for http://[::1]:8765/
    assert client.get("/", headers={"host": "evil.example:8765"}).status_code == 400  # DNS rebinding refused
    session.log.close()


def test_non_ascii_names_get_working_image_urls(tmp_path, folders):
    session = session_for(folders, tmp_path / "votes.jsonl")
    client = _client(session)
    state = client.get("/api/state", params={"annotator": "Jörg Ørsted"}).json()
    assert state["annotator"] == "Jörg-Ørsted"
    assert state["item"]["left"].endswith("?annotator=J%C3%B6rg-%C3%98rsted")  # was a TypeError ("%C3" % ...)
    shown = session.image("Jörg-Ørsted", state["item"]["key"], "left")
    assert client.get(state["item"]["left"]).content == shown.read_bytes()
    session.log.close()


def test_cli_serve_refuses_an_out_file_that_is_not_a_vote_log(tmp_path, folders, capsys):
    import warnings

    from ncppo.cli import main

    out = tmp_path / "notes.txt"
    out.write_text("these are not votes\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["sbs", "serve", str(folders[0]), str(folders[1]), "--out", str(out), "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"ncppo sbs serve: error: {out} is not a vote log of `ncppo sbs serve`: none of its 1 non-empty line(s) "
        "is a vote (line 1: not valid JSON (Expecting value))\n")
    assert out.read_text() == "these are not votes\n"  # nothing appended
