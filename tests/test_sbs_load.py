"""Load on loopback: 50 annotators with private links cast 20 votes each, concurrently, over real HTTP to
`ncppo sbs serve` (the CLI, its own process). Every acknowledged vote is in the JSONL exactly once.

Each annotator is one thread with one keep-alive connection (http.client: little client CPU, so the
numbers are the server's), voting as fast as the server answers. The default limit of 5 votes a
second per link applies: a 429 is waited out (0.2 s) and the vote sent again, which must not
duplicate it. NCPPO_SBS_LOAD_REPORT=PATH writes the measured numbers as JSON (docs/sbs.md)."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time

import numpy as np

from ncppo.sbs.items import QUESTIONS
from test_sbs_access import _start, _stop
from test_sbs_server import make_sample_folders

ANNOTATORS, VOTES_EACH = 50, 20


def test_50_annotators_20_votes_each_none_lost_or_duplicated(tmp_path):
    folders = make_sample_folders(tmp_path)  # 8 items x 3 questions: 24 distinct votes per annotator
    out, names = tmp_path / "votes.jsonl", tmp_path / "names.txt"
    names.write_text("".join(f"rater{i:02d}\n" for i in range(ANNOTATORS)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, text = _start(folders, out, names, port)
    links = dict(re.findall(r"^  (\S+)\s+http://\S+/\?t=(\S+)$", text, re.M))
    assert len(links) == ANNOTATORS
    sent: dict[str, list[tuple]] = {}  # acknowledged (annotator, prompt_index, seed, question, winner)
    latencies, refused, errors = [], [0], []
    lock, start = threading.Lock(), threading.Barrier(ANNOTATORS, timeout=60)

    def annotate(name: str, token: str) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

            def call(method, path, body=None):
                t0 = time.perf_counter()
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read(), time.perf_counter() - t0

            status, body, _ = call("GET", "/api/state")
            state, mine = json.loads(body), []
            start.wait()
            for i in range(VOTES_EACH):
                item = state["item"]
                choice = ("left", "right", "tie")[i % 3]
                vote = json.dumps(dict(key=item["key"], question=item["question"], choice=choice))
                while True:
                    status, body, seconds = call("POST", "/api/vote", vote)
                    with lock:
                        latencies.append((status, seconds))
                    if status != 429:
                        break
                    with lock:
                        refused[0] += 1
                    time.sleep(0.2)
                assert status == 200, body
                state = json.loads(body)
                mine.append((item["key"], item["question"], choice))
            sent[name] = mine
            conn.close()
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{name}: {err!r}")

    threads = [threading.Thread(target=annotate, args=item) for item in links.items()]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wall = time.perf_counter() - t0
    finally:
        _stop(proc)
    assert not errors, errors[:3]

    lines = [json.loads(x) for x in out.read_text().splitlines()]
    recorded = [(v["annotator"], f"{v['prompt_index']}-{v['seed']}", v["question"]) for v in lines]
    assert len(lines) == ANNOTATORS * VOTES_EACH  # none lost, none written twice (a 429 writes nothing)
    assert len(set(recorded)) == len(recorded)
    acknowledged = {(name, key, q) for name, votes in sent.items() for key, q, _ in votes}
    assert set(recorded) == acknowledged and len(acknowledged) == ANNOTATORS * VOTES_EACH
    assert {v["question"] for v in lines} <= set(QUESTIONS)
    choice_of = {(name, key, q): c for name, votes in sent.items() for key, q, c in votes}
    for v in lines:  # the winner recorded is the side this annotator was shown
        c = choice_of[(v["annotator"], f"{v['prompt_index']}-{v['seed']}", v["question"])]
        assert v["winner"] == {"tie": "tie", "left": v["left"], "right": "b" if v["left"] == "a" else "a"}[c]

    ok = np.array([s for status, s in latencies if status == 200]) * 1000
    every = np.array([s for _, s in latencies]) * 1000
    report = dict(annotators=ANNOTATORS, votes_each=VOTES_EACH, votes_written=len(lines), refused_429=refused[0],
                  wall_s=round(wall, 2), votes_per_s=round(len(lines) / wall, 1),
                  p50_ms=round(float(np.percentile(ok, 50)), 1), p95_ms=round(float(np.percentile(ok, 95)), 1),
                  max_ms=round(float(ok.max()), 1), p95_all_requests_ms=round(float(np.percentile(every, 95)), 1),
                  cpus=os.cpu_count())
    print(json.dumps(report))
    if os.environ.get("NCPPO_SBS_LOAD_REPORT"):
        with open(os.environ["NCPPO_SBS_LOAD_REPORT"], "w") as fh:
            json.dump(report, fh, indent=2)
    assert report["p95_ms"] < 10_000  # a sanity bound only: a stuck server, not a slow shared machine
