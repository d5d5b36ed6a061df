"""`ncppo sbs results`: per question, the win rate of A over B from the majority vote per item, its
two-stage bootstrap interval (prompts, then items), inter-annotator agreement and votes per annotator.

An item is one (prompt, seed). Its label is the majority of its annotators' votes ("a", "b" or
"tie"; no strict majority = tie, as in the paper's 3-annotator protocol), valued 1 / 0 / 0.5; the
win rate is the mean over items. The interval is `ncppo.evaluate.stats.win_rate_interval`, as in
`ncppo compare`: a two-stage bootstrap (prompts, then the items of each drawn prompt) widened for
few prompts and never narrower than Wilson's; it does not resample annotators. The win rate of the pooled votes is reported beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..configs import ConfigError, option
from ..errors import InputError
from ..evaluate.stats import win_rate_interval
from .agreement import krippendorff_alpha, pairwise_agreement
from .items import QUESTIONS
from .votes import read_vote_logs

VALUE = {"a": 1.0, "tie": 0.5, "b": 0.0}


@dataclass
class ResultsConfig:
    votes: list[str] = field(metadata={"help": "vote log(s) written by `ncppo sbs serve`", "cli": False})
    out: str = option(".", "folder for sbs.json and sbs.md")
    n_resamples: int = option(10000, "bootstrap resamples")
    confidence: float = option(0.95, "interval confidence")
    seed: int = option(0, "bootstrap seed")
    label_a: str | None = option(None, "name of A in the tables; none = the folder name recorded in the votes "
                                                 "(with its parents when both folders share a name)")
    label_b: str | None = option(None, "name of B in the tables; none = the folder name recorded in the votes")

    def validate(self) -> None:
        if not self.votes:
            raise ConfigError("give at least one vote file")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"--confidence must be in (0, 1), got {self.confidence}")
        if self.n_resamples < 1:
            raise ConfigError("--n-resamples must be >= 1")


def majority(winners: list[str]) -> str:
    """The winner with strictly more votes than any other, else "tie"."""
    (top, n), *rest = Counter(winners).most_common() + [(None, 0)]
    return top if n > rest[0][1] else "tie"


def folder_labels(a: str, b: str) -> tuple[str, str]:
    """Short names for two folders: their basenames, or as many trailing path parts as tell them
    apart (runs/ncp/samples vs runs/base/samples -> "ncp/samples", "base/samples")."""
    pa, pb = Path(a).parts, Path(b).parts
    for n in range(1, max(len(pa), len(pb)) + 1):
        la, lb = "/".join(pa[-n:]), "/".join(pb[-n:])
        if la != lb:
            return la, lb
    return a, b


def compared_folders(votes: list[dict]) -> tuple[str, str]:
    """The (A, B) folder names the votes were cast on; refuses votes on several pairs of folders
    (e.g. `serve A B` and `serve B A`, whose "a" would mean different models). Pairs are told apart
    by the full recorded paths (folders of different runs often share a name such as "samples")."""
    pairs = Counter((str(v.get("a") or ""), str(v.get("b") or "")) for v in votes)
    if len(pairs) > 1:
        listed = ", ".join(f"{a or '?'} vs {b or '?'} ({n} votes)" for (a, b), n in pairs.most_common())
        reversed_ = any((b, a) in pairs for a, b in pairs)
        raise InputError(f"the votes compare different folders: {listed}; "
                         + ("sessions served A and B in reverse order ('a' means a different model in each); "
                            if reversed_ else "") + "give the files of one comparison")
    a, b = next(iter(pairs), ("", ""))
    if not a or not b:
        return os.path.basename(a) or "A", os.path.basename(b) or "B"
    return folder_labels(a, b)


def items_by_question(votes: list[dict]) -> dict[str, dict[tuple[int, int], dict]]:
    """{question: {(prompt_index, seed): {"prompt": text, "votes": {annotator: winner}}}}."""
    table: dict[str, dict] = defaultdict(dict)
    for v in votes:
        key = (v["prompt_index"], v["seed"])
        entry = table[v["question"]].setdefault(key, dict(prompt=v["prompt"], votes={}))
        if entry["prompt"] != v["prompt"]:
            raise InputError(f"prompt {key[0]} seed {key[1]} has two texts in the votes: "
                             f"{entry['prompt']!r} and {v['prompt']!r}")
        entry["votes"][v["annotator"]] = v["winner"]
    known = [q for q in QUESTIONS if q in table]
    return {q: table[q] for q in known + sorted(set(table) - set(known))}


def question_summary(items: dict[tuple[int, int], dict], *, n_resamples: int, confidence: float, seed: int) -> dict:
    """Win rate (majority per item), its interval, counts, pooled-vote win rate and agreement."""
    keys = sorted(items)
    labels = [majority(list(items[k]["votes"].values())) for k in keys]
    values = np.array([VALUE[w] for w in labels])
    prompts = [items[k]["prompt"] for k in keys]
    pooled = [VALUE[w] for k in keys for w in items[k]["votes"].values()]
    units = [list(items[k]["votes"].values()) for k in keys]
    per_item = Counter(len(u) for u in units)
    annotators = Counter(a for k in keys for a in items[k]["votes"])
    low, high = win_rate_interval(values, prompts, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return dict(win_rate=float(values.mean()), win_rate_ci=[low, high], confidence=confidence,
                a_wins=labels.count("a"), ties=labels.count("tie"), b_wins=labels.count("b"),
                n_items=len(keys), n_prompts=len(set(prompts)), n_votes=len(pooled),
                vote_win_rate=float(np.mean(pooled)),
                krippendorff_alpha=krippendorff_alpha(units), pairwise_agreement=pairwise_agreement(units),
                pairable_items=sum(len(u) >= 2 for u in units),
                annotators_per_item={str(k): v for k, v in sorted(per_item.items())},
                votes_per_annotator=dict(sorted(annotators.items())))


def summarize(config: ResultsConfig) -> dict:
    """The sbs.json content for the vote files of `config`."""
    read = read_vote_logs(config.votes)
    if not read.votes:
        raise InputError(f"{', '.join(config.votes)}: no valid votes")
    folder_a, folder_b = compared_folders(read.votes)
    questions = {q: question_summary(items, n_resamples=config.n_resamples, confidence=config.confidence,
                                     seed=config.seed)
                 for q, items in items_by_question(read.votes).items()}
    annotators = defaultdict(dict)
    for q, r in questions.items():
        for name, n in r["votes_per_annotator"].items():
            annotators[name][q] = n
    return dict(votes=[str(p) for p in config.votes], label_a=config.label_a or folder_a,
                label_b=config.label_b or folder_b, n_votes=len(read.votes), superseded_votes=read.superseded,
                bad_lines=len(read.bad), bad_line_examples=read.bad[:10], bad_line_summary=read.bad_summary(),
                resampled="prompts, then items",
                n_resamples=config.n_resamples, seed=config.seed, questions=questions,
                annotators=dict(sorted(annotators.items())))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(result: dict) -> str:
    """The win-rate table per question and the votes-per-annotator table."""
    a, b = result["label_a"], result["label_b"]
    questions = result["questions"]
    pct = f"{round(next(iter(questions.values()))['confidence'] * 100)}%"
    lines = [f"| question | win rate {a} over {b} | {pct} CI | {a} wins | ties | {b} wins | items | prompts "
             "| votes | win rate of votes | Krippendorff's alpha | pairwise agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for q, r in questions.items():
        lo, hi = r["win_rate_ci"]
        lines.append(f"| {q} | {_pct(r['win_rate'])} | [{_pct(lo)}, {_pct(hi)}] | {r['a_wins']} | {r['ties']} "
                     f"| {r['b_wins']} | {r['n_items']} | {r['n_prompts']} | {r['n_votes']} "
                     f"| {_pct(r['vote_win_rate'])} | {_num(r['krippendorff_alpha'])} "
                     f"| {_num(r['pairwise_agreement'])} |")
    lines += ["", "| annotator | " + " | ".join(questions) + " | total |",
              "|---|" + "---|" * (len(questions) + 1)]
    for name, counts in result["annotators"].items():
        lines.append(f"| {name} | " + " | ".join(str(counts.get(q, 0)) for q in questions)
                     + f" | {sum(counts.values())} |")
    lines += ["", f"Win rate: majority vote per item (no strict majority = tie), ties count half. Interval: "
              f"two-stage bootstrap, prompts then items, {result['n_resamples']} resamples, seed {result['seed']}, "
              "widened for few prompts (as `ncppo compare`)."]
    return "\n".join(lines)


def run_results(config: ResultsConfig) -> dict:
    """Summarize, print the tables, write sbs.json and sbs.md to `config.out`."""
    import sys

    from ..manifest import atomic_write_text, package_versions

    result = summarize(config)
    if result["bad_line_summary"]:
        print(f"ncppo sbs results: warning: {result['bad_line_summary']}", file=sys.stderr)
    table = markdown(result)
    out = Path(config.out)
    result["config"] = dataclasses.asdict(config)
    result["versions"] = package_versions()
    atomic_write_text(out / "sbs.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "sbs.md", table + "\n")
    print(f"{result['label_a']} (A) vs {result['label_b']} (B): {result['n_votes']} votes"
          + (f", {result['bad_lines']} bad line(s) skipped" if result["bad_lines"] else ""))
    print(table)
    return result
