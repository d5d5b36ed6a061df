"""`ncppo compare A B`: mean scores, win rate of A over B with a two-stage bootstrap interval
(prompts, then the seeds inside each drawn prompt; `ncppo.evaluate.stats`), and grids."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..configs import ConfigError
from ..errors import InputError, MissingInputError
from .score import KEY_FIELDS, load_images, read_scores
from .stats import mean_ci, paired_bootstrap_ci, win_values


class MismatchError(InputError):
    """Two sample folders do not hold the same prompts and seeds."""

    def __init__(self, detail: str):
        super().__init__(f"the folders do not hold the same prompts and seeds: {detail}")


@dataclass
class CompareConfig:
    dir_a: str = field(metadata={"help": "scored sample folder of model A", "cli": False})
    dir_b: str = field(metadata={"help": "scored sample folder of model B", "cli": False})
    metric: list[str] = field(default_factory=list, metadata={
        "help": "score column(s) to compare, comma-separated; empty = every column both folders have"})
    out: str = field(default=".", metadata={"help": "folder for compare.json (and compare.md)"})
    n_resamples: int = field(default=10000, metadata={"help": "bootstrap resamples"})
    confidence: float = field(default=0.95, metadata={"help": "interval confidence"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    grid: str | None = field(default=None, metadata={
        "help": "write a side-by-side grid of A and B: a .png image or an .html page"})
    grid_prompts: int = field(default=8, metadata={"help": "prompts in the grid (the first N, first seed each)"})
    label_a: str | None = field(default=None, metadata={"help": "name of A in the table; none = its folder name"})
    label_b: str | None = field(default=None, metadata={"help": "name of B in the table; none = its folder name"})

    def validate(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"--confidence must be in (0, 1), got {self.confidence}")
        if self.n_resamples < 1 or self.grid_prompts < 1:
            raise ConfigError("--n-resamples and --grid-prompts must be >= 1")


def _load(folder: Path) -> dict[tuple[int, int], dict]:
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: no such folder")
    rows = read_scores(folder)
    if not rows:
        raise MissingInputError(f"{folder}: no scores.jsonl (run `ncppo score {folder}` first)")
    table = {}
    for n, r in enumerate(rows, 1):
        try:
            key = (int(r["prompt_index"]), int(r["seed"]))
            str(r["prompt"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{folder / 'scores.jsonl'}, row {n}: no usable prompt, prompt_index and seed "
                             f"({type(err).__name__}: {err})") from None
        if key in table:
            raise InputError(f"{folder / 'scores.jsonl'}: prompt {key[0]} seed {key[1]} appears twice")
        table[key] = r
    return table


def check_matching(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> list[tuple[int, int]]:
    """The shared (prompt_index, seed) keys in order; raises MismatchError naming the first difference."""
    for key in sorted(set(a) | set(b)):
        if key not in b:
            raise MismatchError(f"prompt {key[0]} seed {key[1]} ({a[key]['prompt']!r}) is in {name_a} but not in {name_b}")
        if key not in a:
            raise MismatchError(f"prompt {key[0]} seed {key[1]} ({b[key]['prompt']!r}) is in {name_b} but not in {name_a}")
        if a[key]["prompt"] != b[key]["prompt"]:
            raise MismatchError(f"prompt {key[0]} seed {key[1]} differs: {a[key]['prompt']!r} in {name_a}, "
                                f"{b[key]['prompt']!r} in {name_b}")
    return sorted(a)


def _metrics(a: dict, b: dict, wanted: list[str], name_a: str, name_b: str) -> list[str]:
    def columns(t):
        return set.intersection(*({k for k, v in r.items() if k not in KEY_FIELDS and isinstance(v, (int, float))}
                                  for r in t.values()))

    ca, cb = columns(a), columns(b)
    if wanted:
        for m in wanted:
            for cols, name in ((ca, name_a), (cb, name_b)):
                if m not in cols:
                    raise InputError(f"{name}: no scores for metric {m!r} on every image (has {sorted(cols)})")
        return list(wanted)
    shared = sorted(ca & cb)
    if not shared:
        raise InputError(f"{name_a} ({sorted(ca)}) and {name_b} ({sorted(cb)}) share no score column")
    return shared


def compare_folders(config: CompareConfig) -> dict:
    """Compare two scored sample folders; returns the compare.json content."""
    dir_a, dir_b = Path(config.dir_a), Path(config.dir_b)
    label_a = config.label_a or dir_a.resolve().name
    label_b = config.label_b or dir_b.resolve().name
    a, b = _load(dir_a), _load(dir_b)
    keys = check_matching(a, b, str(dir_a), str(dir_b))
    groups = np.array([k[0] for k in keys])
    grouped = len(set(groups.tolist())) < len(keys)  # several seeds per prompt: prompts, then seeds
    kw = dict(n_resamples=config.n_resamples, confidence=config.confidence, seed=config.seed, groups=groups)
    results = {}
    for m in _metrics(a, b, config.metric, str(dir_a), str(dir_b)):
        xa = np.array([a[k][m] for k in keys], dtype=np.float64)
        xb = np.array([b[k][m] for k in keys], dtype=np.float64)
        for x, d in ((xa, dir_a), (xb, dir_b)):
            if not np.all(np.isfinite(x)):
                raise InputError(f"{d / 'scores.jsonl'}: non-finite {m} scores")
        wins = win_values(xa, xb)
        mean_a, lo_a, hi_a = mean_ci(xa, **kw)
        mean_b, lo_b, hi_b = mean_ci(xb, **kw)
        results[m] = dict(mean_a=mean_a, mean_a_ci=[lo_a, hi_a], mean_b=mean_b, mean_b_ci=[lo_b, hi_b],
                          win_rate=float(wins.mean()), win_rate_ci=list(paired_bootstrap_ci(xa, xb, **kw)),
                          wins=int((xa > xb).sum()), ties=int((xa == xb).sum()), losses=int((xa < xb).sum()),
                          n=len(keys), confidence=config.confidence)
    return dict(a=str(dir_a), b=str(dir_b), label_a=label_a, label_b=label_b, n_images=len(keys),
                n_prompts=len(set(groups.tolist())), resampled="prompts, then seeds" if grouped else "images",
                n_resamples=config.n_resamples, seed=config.seed, metrics=results)


def write_grid(config: CompareConfig, result: dict) -> Path:
    """The side-by-side grid of the first `grid_prompts` prompts (first seed each), .png or .html."""
    from .report import grid_html, grid_image

    dir_a, dir_b = Path(config.dir_a), Path(config.dir_b)
    a, b = _load(dir_a), _load(dir_b)
    first = {}
    for key in sorted(a):
        first.setdefault(key[0], key)
    keys = list(first.values())[: config.grid_prompts]
    metrics = list(result["metrics"])

    def caption(r):
        return "  ".join(f"{m} {r[m]:.3g}" for m in metrics if isinstance(r.get(m), (int, float)) and math.isfinite(r[m]))

    out = Path(config.grid)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".html", ".htm"):
        import os

        rows = [dict(prompt=a[k]["prompt"], caption_a=caption(a[k]), caption_b=caption(b[k]),
                     src_a=os.path.relpath((dir_a / a[k]["file"]).resolve(), out.parent.resolve()),
                     src_b=os.path.relpath((dir_b / b[k]["file"]).resolve(), out.parent.resolve())) for k in keys]
        out.write_text(grid_html(rows, result["label_a"], result["label_b"]), encoding="utf-8")
    else:
        ims_a = load_images(dir_a, [a[k] for k in keys])
        ims_b = load_images(dir_b, [b[k] for k in keys])
        rows = [dict(prompt=a[k]["prompt"], image_a=ia, image_b=ib, caption_a=f"{result['label_a']}: {caption(a[k])}",
                     caption_b=f"{result['label_b']}: {caption(b[k])}") for k, ia, ib in zip(keys, ims_a, ims_b)]
        grid_image(rows).save(out)
    return out


def run_compare(config: CompareConfig) -> dict:
    """Compare, print the markdown table, write compare.json and compare.md (and the grid)."""
    from ..manifest import package_versions
    from .report import markdown_table

    result = compare_folders(config)
    table = markdown_table(result["metrics"], result["label_a"], result["label_b"])
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.grid:
        result["grid"] = str(write_grid(config, result))
    result["config"] = dataclasses.asdict(config)
    result["versions"] = package_versions()
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compare.md").write_text(table + "\n")
    print(f"{result['label_a']} (A) vs {result['label_b']} (B): {result['n_images']} images, "
          f"{result['n_prompts']} prompts")
    print(table)
    return result
