"""`ncppo score`: score every image of a sample folder with reward models, merged into scores.jsonl/.csv."""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configs import ConfigError
from ..errors import InputError
from .sample import DTYPES, read_index, read_jsonl
from .scorers import SCORERS, get_scorer, is_callable_spec, score_in_batches

SCORES_FILE = "scores.jsonl"
SCORES_CSV = "scores.csv"
MANIFEST_FILE = "score_manifest.json"
KEY_FIELDS = ("prompt_index", "seed", "prompt", "file")


@dataclass
class ScoreConfig:
    dir: str = field(metadata={"help": "sample folder (holding index.jsonl from `ncppo sample`)", "cli": False})
    scorer: list[str] = field(default_factory=lambda: ["pickscore"], metadata={
        "help": f"scorer name(s), comma-separated: {', '.join(SCORERS)}, or your own reward function as "
                "module:callable (a module on the Python path or a .py file; called as fn(images: list[PIL.Image], "
                "prompts: list[str]) -> one float per image; see docs/evaluation.md)"})
    scorer_path: list[str] = field(default_factory=list, metadata={
        "help": "weights per scorer (file, folder or hub id), comma-separated in --scorer order; "
                "'default' keeps a scorer's default"})
    scorer_option: list[str] = field(default_factory=list, metadata={
        "help": "scorer options KEY=VALUE, comma-separated, given to every scorer that takes them "
                "(e.g. clip_model=DIR for aesthetic, processor=DIR, tokenizer=DIR, config=FILE)"})
    batch_size: int = field(default=16, metadata={"help": "images per scorer call"})
    device: str = field(default="auto", metadata={"help": "torch device; auto = cuda when available, else cpu"})
    dtype: str = field(default="float32", metadata={"help": "scorer weights dtype", "choices": list(DTYPES)})

    def validate(self) -> None:
        unknown = [s for s in self.scorer if s not in SCORERS and not is_callable_spec(s)]
        if unknown:
            raise ConfigError(f"--scorer: unknown {unknown}; choose from {list(SCORERS)} or name your own as "
                              "module:callable")
        if self.scorer_path and len(self.scorer_path) != len(self.scorer):
            raise ConfigError(f"--scorer-path: give one path per scorer ({len(self.scorer)}), got {len(self.scorer_path)}")
        for opt in self.scorer_option:
            if "=" not in opt:
                raise ConfigError(f"--scorer-option: expected KEY=VALUE, got {opt!r}")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")

    def options(self) -> dict[str, str]:
        return dict(opt.split("=", 1) for opt in self.scorer_option)


def read_scores(folder: str | Path) -> list[dict]:
    """Rows of `folder/scores.jsonl` (the index keys plus one column per scorer); [] when absent."""
    path = Path(folder) / SCORES_FILE
    if not path.is_file():
        return []
    return read_jsonl(path)


def load_images(folder: Path, rows: list[dict]) -> list:
    from PIL import Image

    images = []
    for row in rows:
        if not isinstance(row.get("file"), str):
            raise InputError(f"{folder}: the row of prompt {row.get('prompt_index')}, seed {row.get('seed')} "
                             "names no image file")
        path = folder / row["file"]
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise InputError(f"{path} (index row prompt {row.get('prompt_index')}, seed {row.get('seed')}): "
                             f"cannot read image ({err})") from None
    return images


def write_scores(folder: Path, rows: list[dict]) -> None:
    """scores.jsonl and scores.csv, each written whole under a temporary name and renamed (a crash
    leaves the previous file, never a cut one)."""
    import io

    from ..manifest import atomic_write_text

    atomic_write_text(folder / SCORES_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    columns = list(KEY_FIELDS) + sorted({k for r in rows for k in r} - set(KEY_FIELDS))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / SCORES_CSV, buf.getvalue())


def run_score(config: ScoreConfig) -> dict[str, float]:
    """Score every image of `config.dir` with each scorer (loaded once, run in batches) and merge the
    columns into scores.jsonl / scores.csv. Returns {scorer: mean score}."""
    from ..manifest import write_manifest

    folder = Path(config.dir)
    index = read_index(folder)
    if not index:
        raise InputError(f"{folder / 'index.jsonl'}: empty index (no rows); run `ncppo sample` into it first")
    old = {(r["prompt_index"], r["seed"]): r for r in read_scores(folder)}
    rows = []
    for r in index:
        row = {k: r[k] for k in KEY_FIELDS}
        prev = old.get((r["prompt_index"], r["seed"]))
        if prev is not None and prev.get("prompt") == r["prompt"]:
            row.update({k: v for k, v in prev.items() if k not in KEY_FIELDS})
        rows.append(row)
    images = load_images(folder, index)
    prompts = [r["prompt"] for r in index]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    means = {}
    for k, name in enumerate(config.scorer):
        path = config.scorer_path[k] if config.scorer_path else None
        path = None if path in (None, "", "default") else path
        scorer = get_scorer(name, path, device=device, dtype=DTYPES[config.dtype],
                            **accepted_options(name, config.options()))
        scores = score_in_batches(scorer, images, prompts, config.batch_size, progress=True)
        for row, value in zip(rows, scores.tolist()):
            row[scorer.name] = value
        means[scorer.name] = float(scores.mean())
        del scorer
    write_scores(folder, rows)
    manifest = folder / MANIFEST_FILE
    runs = json.loads(manifest.read_text()).get("runs", {}) if manifest.is_file() else {}
    for name in means:  # one entry per score column, kept across runs that add other columns
        runs[name] = {"config": dataclasses.asdict(config), "mean": means[name], "num_images": len(rows)}
    write_manifest(manifest, command="score", config=config, runs=runs)
    return means


def accepted_options(name: str, options: dict) -> dict:
    """The options a scorer's constructor takes (so one --scorer-option list can serve several)."""
    import inspect

    from .scorers import _import

    if is_callable_spec(name):
        return {}
    params = inspect.signature(_import(SCORERS[name][0])).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}
