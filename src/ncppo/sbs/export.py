"""`ncppo sbs export`: human votes as Pick-a-Pic-schema preference pairs for `ncppo train`.

Image 0 is always model A's image and image 1 model B's, for the same prompt and seed; label_0 is
1 when A won, 0 when B won and 0.5 for a tie (label_1 = 1 - label_0). `--aggregate majority` writes
one pair per item labelled by the majority of its annotators, `--aggregate votes` one pair per vote.
Parquet output embeds the image files' bytes (PNG) in jpg_0/jpg_1, as Pick-a-Pic does; JSONL output
names the files (absolute paths) in image_0/image_1.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..configs import ConfigError, option
from ..errors import InputError
from .items import QUESTIONS, item_key, load_items
from .results import VALUE, items_by_question, majority
from .votes import read_vote_logs

PAIRS_PARQUET = "pairs.parquet"
PAIRS_JSONL = "pairs.jsonl"
MANIFEST = "export_manifest.json"
ROW_GROUP = 256  # rows per parquet row group: bounds memory with large images


@dataclass
class ExportConfig:
    votes: list[str] = field(metadata={"help": "vote log(s) written by `ncppo sbs serve`", "cli": False})
    out: str = field(metadata={"help": "output folder (pairs.parquet or pairs.jsonl, export_manifest.json); "
                                       "`ncppo train --data` and `ncppo data check` read it"})
    question: str = option("general", "which question's votes become the label", choices=list(QUESTIONS))
    aggregate: str = option("majority", "majority = one pair per item (majority of its annotators); "
                                        "votes = one pair per vote", choices=["majority", "votes"])
    format: str = option("parquet", "parquet = image bytes inside the file; jsonl = image file paths",
                         choices=["parquet", "jsonl"])
    drop_ties: bool = option(False, "leave out pairs labelled a tie (0.5)")
    dir_a: str | None = option(None, "sample folder of A; none = the folder recorded in the votes (set it when "
                                     "the folders moved)")
    dir_b: str | None = option(None, "sample folder of B; none = the folder recorded in the votes")

    def validate(self) -> None:
        if not self.votes:
            raise ConfigError("give at least one vote file")


def _same_folder(recorded, chosen: str) -> bool:
    if not recorded:
        return False
    try:
        return Path(str(recorded)).expanduser().resolve() == Path(chosen).expanduser().resolve()
    except (OSError, RuntimeError):
        return str(recorded) == chosen


FLIP = {"a": "b", "b": "a", "tie": "tie"}


def _folders(votes: list[dict], config: ExportConfig) -> tuple[str, str, dict[tuple, bool]]:
    """The A and B sample folders, and for each recorded (a, b) pair of the votes whether its
    winners are flipped to them (votes of `serve B A` when A is chosen first). A recorded pair is
    matched by both paths against the chosen folders in either order; when the votes record a single
    pair, folders that moved (matching neither path) are taken in the recorded order."""
    recorded = Counter((v.get("a"), v.get("b")) for v in votes)
    pairs = list(recorded)
    reverse_of_one = len(pairs) == 2 and pairs[0] == pairs[1][::-1]
    if config.dir_a is None and config.dir_b is None:
        if len(pairs) != 1 and not reverse_of_one:
            raise InputError(f"the votes name {len(pairs)} pairs of sample folders; give --dir-a and --dir-b")
        a, b = max(pairs, key=lambda p: recorded[p])  # the order most votes were cast in (first on a tie)
    elif config.dir_a is None or config.dir_b is None:
        if len(pairs) != 1:
            raise InputError(f"the votes name {len(pairs)} pairs of sample folders; give both --dir-a and --dir-b")
        a, b = config.dir_a or pairs[0][0], config.dir_b or pairs[0][1]
    else:
        a, b = config.dir_a, config.dir_b
    if not a or not b:
        raise InputError("the votes do not record their sample folders; give --dir-a and --dir-b")
    flipped = {}
    for ra, rb in pairs:
        same = _same_folder(ra, a) + _same_folder(rb, b)
        swapped = _same_folder(ra, b) + _same_folder(rb, a)
        if len(pairs) > 1 and 2 not in (same, swapped):
            raise InputError(f"{recorded[(ra, rb)]} vote(s) were cast on {ra} vs {rb}, which is neither "
                             f"--dir-a {a} --dir-b {b} nor the reverse; give the vote files of this comparison")
        flipped[(ra, rb)] = swapped > same
    return a, b, flipped


def pair_rows(config: ExportConfig) -> tuple[list[dict], dict]:
    """The pairs to write (without image bytes) and counts for the manifest."""
    read = read_vote_logs(config.votes)
    votes = [v for v in read.votes if v["question"] == config.question]
    if not votes:
        raise InputError(f"{', '.join(config.votes)}: no valid votes on question {config.question!r}")
    dir_a, dir_b, flipped = _folders(votes, config)
    votes = [v | {"winner": FLIP[v["winner"]]} if flipped[(v.get("a"), v.get("b"))] else v for v in votes]
    items = {it.key: it for it in load_items(dir_a, dir_b)}
    model_a, model_b = Path(dir_a).resolve().name, Path(dir_b).resolve().name
    rows = []
    for (pi, seed), entry in sorted(items_by_question(votes)[config.question].items()):
        item = items.get(item_key(pi, seed))
        if item is None or item.prompt != entry["prompt"]:
            raise InputError(f"prompt {pi} seed {seed} ({entry['prompt']!r}) of the votes is not in {dir_a} and {dir_b}")
        winners = list(entry["votes"].values())
        labels = [(majority(winners), len(winners))] if config.aggregate == "majority" else [(w, 1) for w in winners]
        for winner, n in labels:
            if config.drop_ties and winner == "tie":
                continue
            rows.append(dict(caption=item.prompt, label_0=VALUE[winner], label_1=1.0 - VALUE[winner],
                             image_0=str(item.file_a), image_1=str(item.file_b),
                             image_0_uid=f"{model_a}/{item.key}", image_1_uid=f"{model_b}/{item.key}",
                             model_0=model_a, model_1=model_b, prompt_index=pi, seed=seed,
                             question=config.question, num_votes=n))
    if not rows:
        raise InputError("no pairs to export (every item was a tie and --drop-ties is set)")
    counts = dict(pairs=len(rows), votes=len(votes), items=len({(r["prompt_index"], r["seed"]) for r in rows}),
                  ties=sum(r["label_0"] == 0.5 for r in rows), dir_a=dir_a, dir_b=dir_b,
                  bad_vote_lines=len(read.bad), bad_vote_line_examples=read.bad[:10],
                  bad_vote_summary=read.bad_summary(), superseded_votes=read.superseded)
    return rows, counts


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64()), ("image_0_uid", pa.string()),
                        ("image_1_uid", pa.string()), ("model_0", pa.string()), ("model_1", pa.string()),
                        ("prompt_index", pa.int64()), ("seed", pa.int64()), ("question", pa.string()),
                        ("num_votes", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(rows), ROW_GROUP):
            chunk = rows[start:start + ROW_GROUP]
            columns = {name: [r.get(name) for r in chunk] for name in schema.names if not name.startswith("jpg_")}
            columns["jpg_0"] = [Path(r["image_0"]).read_bytes() for r in chunk]
            columns["jpg_1"] = [Path(r["image_1"]).read_bytes() for r in chunk]
            writer.write_table(pa.table(columns, schema=schema))


def run_export(config: ExportConfig) -> Path:
    """Write the pairs (atomically) and the manifest; returns the pairs file."""
    from ..manifest import write_manifest

    rows, counts = pair_rows(config)
    if counts["bad_vote_summary"]:
        print(f"ncppo sbs export: warning: {counts['bad_vote_summary']}", file=sys.stderr)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / (PAIRS_PARQUET if config.format == "parquet" else PAIRS_JSONL)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if config.format == "parquet":
        _write_parquet(rows, tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, target)
    write_manifest(out / MANIFEST, command="sbs export", config=config, **counts)
    print(f"ncppo sbs export: {counts['pairs']} pairs ({counts['ties']} ties) from {counts['votes']} votes "
          f"on {config.question!r} -> {target}")
    return target
