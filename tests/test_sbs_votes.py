"""The vote log: whole lines under concurrent writers (threads and processes), crash leftovers, re-votes."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

from ncppo.sbs.votes import VoteLog, read_votes


def vote(annotator="ann", prompt_index=0, seed=0, question="general", winner="a", **extra):
    return dict(prompt=f"prompt {prompt_index}", prompt_index=prompt_index, seed=seed, question=question,
                winner=winner, left="a", annotator=annotator, time="2025-01-01T00:00:00+00:00", **extra)


def _writer(path, name, n, size):
    with VoteLog(path) as log:
        threads = [threading.Thread(target=lambda t=t: [log.append(vote(f"{name}.{t}", i, pad="x" * size))
                                                        for i in range(n)]) for t in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def test_concurrent_writers_never_interleave(tmp_path):
    path, n, size = tmp_path / "votes.jsonl", 20, 200_000  # lines far beyond any pipe/buffer size
    procs = [multiprocessing.get_context("spawn").Process(target=_writer, args=(path, f"p{k}", n, size))
             for k in range(2)]
    for p in procs:
        p.start()
    _writer(path, "main", n, size)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == 3 * 2 * n
    rows = [json.loads(x) for x in lines[:-1]]  # every line parses: no torn or interleaved writes
    assert all(len(r["pad"]) == size for r in rows)
    assert len({(r["annotator"], r["prompt_index"]) for r in rows}) == 3 * 2 * n


def test_a_line_cut_by_a_crash_is_skipped_and_the_next_vote_is_whole(tmp_path):
    path = tmp_path / "votes.jsonl"
    with VoteLog(path) as log:
        log.append(vote(prompt_index=0))
        log.append(vote(prompt_index=1))
    whole = path.read_bytes()
    path.write_bytes(whole + json.dumps(vote(prompt_index=2)).encode()[:40])  # the crash: half a line, no newline
    with VoteLog(path) as log:
        log.append(vote(prompt_index=3))
    with pytest.warns(UserWarning, match=r"skipped 1 bad vote line\(s\): .*votes.jsonl, line 3: not valid JSON"):
        read = read_votes(path)
    assert [v["prompt_index"] for v in read.votes] == [0, 1, 3] and read.lines == 3


def test_later_votes_replace_earlier_ones_and_bad_rows_are_counted(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(v) for v in [
        vote(winner="a"), vote(question="visual", winner="b"), vote(annotator="bob", winner="tie"),
        vote(winner="left"), vote(seed="0"), {"prompt": "p"}, [1, 2]]) + "\n\n")
    second.write_text(json.dumps(vote(winner="b")) + "\n")
    read = read_votes([first, second], warn=False)
    assert read.lines == 4 and read.superseded == 1 and len(read.bad) == 4
    assert [(v["annotator"], v["question"], v["winner"]) for v in read.votes] == [
        ("ann", "general", "b"), ("ann", "visual", "b"), ("bob", "general", "tie")]
    assert "line 4: winner 'left' is not one of" in read.bad[0] and "line 5: seed '0' is not an integer" in read.bad[1]
    with pytest.raises(FileNotFoundError, match="no such vote file"):
        read_votes(tmp_path / "missing.jsonl")


def test_group_commit_batches_concurrent_votes_and_fails_a_whole_batch(tmp_path, monkeypatch):
    path = tmp_path / "votes.jsonl"
    log = VoteLog(path)
    writes, gate, real_write = [], threading.Event(), VoteLog._write

    def slow_write(self, data):  # the first write waits, so the other threads' votes queue behind it
        writes.append(data.count(b"\n"))
        gate.wait(5)
        real_write(self, data)

    monkeypatch.setattr(VoteLog, "_write", slow_write)
    threads = [threading.Thread(target=log.append, args=(vote(f"r{i}"),)) for i in range(8)]
    threads[0].start()
    while not writes:
        threading.Event().wait(0.001)
    for t in threads[1:]:
        t.start()
    for _ in range(5000):  # until the 7 others are queued behind the running write
        with log._commit:
            if len(log._queue) == 7:
                break
        threading.Event().wait(0.001)
    gate.set()
    for t in threads:
        t.join(5)
    assert writes == [1, 7]  # one write+fsync for the 7 votes that arrived meanwhile
    assert sorted(v["annotator"] for v in read_votes(path).votes) == [f"r{i}" for i in range(8)]

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(VoteLog, "_write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        log.append(vote("late"))
    monkeypatch.setattr(VoteLog, "_write", real_write)
    log.append(vote("after"))  # the log is usable again: no writer is left marked busy
    log.close()
    assert [v["annotator"] for v in read_votes(path).votes][-1] == "after" and len(read_votes(path).votes) == 9
