"""`ncppo data generate`: on-policy preference pairs from a model's own samples, labelled by reward models.

One more reader of the same pieces (DESIGN.md): `evaluate.sample.run_sample` draws K candidates per
prompt (seed-exact per (prompt, candidate), several processes, crash-safe resume that refuses other
settings), `evaluate.scorers` label them in batches (any built-in scorer, the toy judges, or a
user's ``module:callable``), and the pairs are written in the one schema `train` reads.

Layout of ``--out``:
    train-00000-of-00001.parquet   the pairs (Pick-a-Pic schema, see PAIR_COLUMNS), winner first
    manifest.json                  model, LoRA hash, scorers and weights, sampler settings, prompt
                                   hashes, seeds, counts, scorer statistics, timings
    candidates/                    the samples (images/, index.jsonl, sample_manifest.json) and their
                                   raw scores (scores.jsonl, one column per scorer; reused on rerun)

Labelling. Each scorer's raw scores are put on one scale (`--combine`), then averaged with the
scorers' weights into one combined score per candidate:
    zscore  centred per prompt, divided by the scorer's pooled within-prompt standard deviation
            (over all prompts of this run), so weights mean what they say and a prompt whose
            candidates all score alike stays a near tie;
    rank    per prompt, 0 (worst) .. 1 (best), ties averaged;
    raw     the raw scores (one scorer: margins in its own units).
Pairs (`--pairs`): best-worst (the highest against the lowest candidate of each prompt) or all
(every pair of candidates), each kept when its margin (winner's minus loser's combined score) is
at least `--min-margin`; the others are near ties, dropped and counted. `--soft-labels T` writes
label_0 = sigmoid(margin / T) instead of 1. A candidate with a non-finite score under any scorer
takes part in no pair; such images are counted and named in the manifest.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..configs import ConfigError
from ..errors import InputError, RunError
from ..evaluate.sample import SampleConfig

CANDIDATES = "candidates"
SHARD_NAME = "train-00000-of-00001.parquet"
MANIFEST = "manifest.json"
SCORE_SOURCES = "score_sources.json"  # in candidates/: which weights each cached score column came from
COMBINE = ("zscore", "rank", "raw")
PAIRING = ("best-worst", "all")


@dataclass
class GenerateConfig(SampleConfig):
    """`ncppo data generate`: the sampler settings of `ncppo sample`, K candidates per prompt, scorers, pairing."""

    out: str = field(metadata={"help": "output folder: the pair dataset (train-00000-of-00001.parquet, what train --data "
                                       "reads), manifest.json, and candidates/ (the samples and their scores)"})
    seeds: list[int] = field(default_factory=list, metadata={"cli": False, "help": "set from --seed and --per-prompt"})
    per_prompt: int = field(default=4, metadata={"help": "candidates K per prompt (>= 2); candidate k has seed --seed + k"})
    seed: int = field(default=0, metadata={"help": "seed of candidate 0 of every prompt (k: seed + k)"})
    scorer: list[str] = field(default_factory=lambda: ["pickscore"], metadata={
        "help": "labelling scorers NAME[:WEIGHT], comma-separated: any `ncppo score` scorer, toy-judge, toy-proxy, or "
                "your own module:callable (fn(images, prompts) -> one float per image); weight default 1"})
    scorer_path: list[str] = field(default_factory=list, metadata={
        "help": "weights per scorer (file, folder or hub id), comma-separated in --scorer order; 'default' keeps "
                "a scorer's default"})
    scorer_option: list[str] = field(default_factory=list, metadata={
        "help": "scorer options KEY=VALUE, comma-separated, given to every scorer that takes them"})
    combine: str = field(default="zscore", metadata={
        "help": "how several scorers make one score: zscore (centred per prompt, in units of the scorer's pooled "
                "within-prompt spread), rank (per prompt, 0..1) or raw (weighted raw scores)", "choices": list(COMBINE)})
    pairs: str = field(default="best-worst", metadata={
        "help": "best-worst: one pair per prompt (highest vs lowest candidate); all: every pair of candidates",
        "choices": list(PAIRING)})
    min_margin: float = field(default=0.1, metadata={
        "help": "keep a pair only if winner minus loser (combined score) is at least this; closer ones are near "
                "ties, dropped and counted"})
    max_pairs_per_prompt: int | None = field(default=None, metadata={
        "help": "at most this many pairs per prompt, the largest margins first; none = no cap"})
    soft_labels: float | None = field(default=None, metadata={
        "help": "temperature T: write label_0 = sigmoid(margin / T) instead of 1 (train uses it as the target "
                "probability); none = hard labels"})
    score_batch_size: int = field(default=16, metadata={"help": "images per scorer call"})
    score_device: str = field(default="auto", metadata={"help": "scorer device; auto = cuda when available, else cpu"})

    def __post_init__(self):
        self.seeds = [self.seed + k for k in range(self.per_prompt)] if self.per_prompt >= 1 else []

    def validate(self) -> None:
        from ..evaluate.scorers import SCORERS, is_callable_spec, parse_weighted

        if self.per_prompt < 2:
            raise ConfigError(f"--per-prompt must be >= 2 (a pair needs two candidates), got {self.per_prompt}")
        super().validate()
        if not self.scorer:
            raise ConfigError("--scorer: name at least one scorer")
        for spec in self.scorer:
            name, weight = parse_weighted(spec)
            if name not in SCORERS and not is_callable_spec(name):
                raise ConfigError(f"--scorer: unknown {name!r}; choose from {sorted(SCORERS)} or name your own as "
                                  "module:callable")
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"--scorer {spec}: the weight must be a positive number")
        names = [parse_weighted(s)[0] for s in self.scorer]
        if len(set(names)) != len(names):
            raise ConfigError(f"--scorer: a scorer is named twice in {names}")
        if self.scorer_path and len(self.scorer_path) != len(self.scorer):
            raise ConfigError(f"--scorer-path: give one path per scorer ({len(self.scorer)}), got {len(self.scorer_path)}")
        for opt in self.scorer_option:
            if "=" not in opt:
                raise ConfigError(f"--scorer-option: expected KEY=VALUE, got {opt!r}")
        if not (math.isfinite(self.min_margin) and self.min_margin >= 0):
            raise ConfigError(f"--min-margin must be >= 0, got {self.min_margin}")
        if self.max_pairs_per_prompt is not None and self.max_pairs_per_prompt < 1:
            raise ConfigError(f"--max-pairs-per-prompt must be >= 1, got {self.max_pairs_per_prompt}")
        if self.soft_labels is not None and not (math.isfinite(self.soft_labels) and self.soft_labels > 0):
            raise ConfigError(f"--soft-labels must be a temperature > 0, got {self.soft_labels}")
        if self.score_batch_size < 1:
            raise ConfigError("--score-batch-size must be >= 1")

    def options(self) -> dict[str, str]:
        return dict(opt.split("=", 1) for opt in self.scorer_option)

    def weighted_scorers(self) -> list[tuple[str, float, str | None]]:
        """(name, weight, weights path or None) per --scorer."""
        from ..evaluate.scorers import parse_weighted

        out = []
        for k, spec in enumerate(self.scorer):
            name, weight = parse_weighted(spec)
            path = self.scorer_path[k] if self.scorer_path else None
            out.append((name, weight, None if path in (None, "", "default") else path))
        return out

    def sample_config(self) -> SampleConfig:
        """The `ncppo sample` run that draws the candidates (into ``out/candidates``)."""
        values = {f.name: getattr(self, f.name) for f in fields(SampleConfig)}
        values.update(out=str(Path(self.out) / CANDIDATES), seeds=list(self.seeds))
        return SampleConfig(**values)


# ------------------------------------------------------------------------------ labelling (pure numpy)

def combine_scores(raw: dict[str, np.ndarray], weights: dict[str, float], groups: np.ndarray, how: str) -> np.ndarray:
    """One combined score per candidate from each scorer's raw scores (N,), candidates grouped by
    prompt (`groups`, N ints). NaN where any scorer's score is not finite. See the module docstring."""
    n = len(groups)
    finite = np.ones(n, bool)
    for values in raw.values():
        finite &= np.isfinite(values)
    total = np.zeros(n)
    for name, values in raw.items():
        values = np.where(finite, values, np.nan)
        if how == "raw":
            scaled = values
        elif how == "zscore":
            centred = values - _group_reduce(values, groups, np.nanmean)
            dof = finite.sum() - len(np.unique(groups[finite]))
            spread = math.sqrt(np.nansum(centred ** 2) / dof) if dof > 0 else 0.0
            scaled = centred / spread if spread > 0 else np.where(finite, 0.0, np.nan)
        else:  # rank
            scaled = _group_ranks(values, groups)
        total += weights[name] * scaled
    combined = total / sum(weights[name] for name in raw)
    return np.where(finite, combined, np.nan)


def _group_reduce(values: np.ndarray, groups: np.ndarray, fn) -> np.ndarray:
    out = np.full(len(values), np.nan)
    for g in np.unique(groups):
        member = groups == g
        if np.isfinite(values[member]).any():
            out[member] = fn(values[member])
    return out


def _group_ranks(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per group: rank of each finite value scaled to 0 (lowest) .. 1 (highest), ties averaged."""
    out = np.full(len(values), np.nan)
    for g in np.unique(groups):
        idx = np.flatnonzero((groups == g) & np.isfinite(values))
        if len(idx) < 2:
            out[idx] = 0.5
            continue
        v = values[idx]
        less = (v[None, :] < v[:, None]).sum(1)
        equal = (v[None, :] == v[:, None]).sum(1)
        out[idx] = (less + (equal - 1) / 2) / (len(idx) - 1)
    return out


def make_pairs(combined: np.ndarray, groups: np.ndarray, *, mode: str, min_margin: float,
               max_per_prompt: int | None) -> tuple[list[tuple[int, int, float]], dict]:
    """(winner index, loser index, margin) per kept pair, prompt by prompt, largest margin first within
    a prompt; and counts: pairs, near_ties, prompts_without_pair, candidates_unscored."""
    pairs: list[tuple[int, int, float]] = []
    counts = {"near_ties": 0, "prompts_without_pair": 0, "candidates_unscored": int((~np.isfinite(combined)).sum())}
    for g in dict.fromkeys(groups.tolist()):  # prompts in order of first appearance
        idx = [int(i) for i in np.flatnonzero(groups == g) if np.isfinite(combined[i])]
        if mode == "best-worst":
            candidates = []
            if len(idx) >= 2:
                best = max(idx, key=lambda i: (combined[i], -i))
                worst = min(idx, key=lambda i: (combined[i], i))
                candidates = [(best, worst, float(combined[best] - combined[worst]))]
        else:
            candidates = []
            for a in range(len(idx)):
                for b in range(a + 1, len(idx)):
                    i, j = idx[a], idx[b]
                    win, lose = (i, j) if combined[i] >= combined[j] else (j, i)
                    candidates.append((win, lose, float(combined[win] - combined[lose])))
            candidates.sort(key=lambda p: -p[2])
        kept = [p for p in candidates if p[2] >= min_margin and p[2] > 0]
        counts["near_ties"] += len(candidates) - len(kept)
        if max_per_prompt is not None:
            kept = kept[:max_per_prompt]
        if not kept:
            counts["prompts_without_pair"] += 1
        pairs.extend(kept)
    counts["pairs"] = len(pairs)
    return pairs, counts


def soft_label(margin: float, temperature: float | None) -> float:
    """label_0 of a winner-first pair: 1, or sigmoid(margin / T) with soft labels."""
    if temperature is None:
        return 1.0
    return 1.0 / (1.0 + math.exp(-margin / temperature))


# ------------------------------------------------------------------------------ scoring with a cache

def _resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def score_candidates(folder: Path, index: list[dict], scorers: list[tuple[str, float, str | None]], *,
                     options: dict, batch_size: int, device: str, dtype, loaded: dict | None = None,
                     progress: bool = True, stage: str | None = None) -> dict[str, np.ndarray]:
    """Raw scores {scorer: (N,)} of the candidates of `index`, from `folder/scores.jsonl` where a
    column was made with the same weights, else by scoring the images in batches (images are read
    per batch, never all at once). `loaded` maps names to already-loaded scorers."""
    from tqdm.auto import tqdm

    from ..evaluate.sample import read_jsonl
    from ..evaluate.score import KEY_FIELDS, SCORES_FILE, accepted_options, load_images, write_scores
    from ..evaluate.scorers import get_scorer
    from ..manifest import atomic_write_text

    sources_file = folder / SCORE_SOURCES
    sources = json.loads(sources_file.read_text()) if sources_file.is_file() else {}
    cached = {}
    if (folder / SCORES_FILE).is_file():
        cached = {(r["prompt_index"], r["seed"], r["prompt"]): r for r in read_jsonl(folder / SCORES_FILE)}
    rows = [{k: r[k] for k in KEY_FIELDS} for r in index]
    out = {}
    for name, _weight, path in scorers:
        source = {"path": path, "options": accepted_options(name, options)}
        values = np.array([cached.get((r["prompt_index"], r["seed"], r["prompt"]), {}).get(name, np.nan)
                           if sources.get(name) == source else np.nan for r in index], dtype=np.float64)
        done = np.array([name in cached.get((r["prompt_index"], r["seed"], r["prompt"]), {})
                         and sources.get(name) == source for r in index])
        todo = np.flatnonzero(~done)
        if len(todo):
            scorer = (loaded or {}).get(name) or get_scorer(name, path, device=device, dtype=dtype,
                                                            **accepted_options(name, options))
            desc = f"{stage + ': ' if stage else ''}scoring {name}"
            for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch", disable=not progress):
                chunk = todo[start:start + batch_size]
                images = load_images(folder, [index[i] for i in chunk])
                scores = scorer.score(images, [index[i]["prompt"] for i in chunk])
                values[chunk] = scores.detach().double().cpu().numpy().reshape(-1)
        sources[name] = source
        out[name] = values
    for k, row in enumerate(rows):
        previous = cached.get((row["prompt_index"], row["seed"], row["prompt"]), {})
        row.update({c: v for c, v in previous.items() if c not in KEY_FIELDS})
        row.update({name: (float(values[k]) if np.isfinite(values[k]) else None) for name, values in out.items()})
    write_scores(folder, rows)  # scores.jsonl / scores.csv, as `ncppo score` writes them (atomically)
    atomic_write_text(sources_file, json.dumps(sources, indent=2))
    return out


# ------------------------------------------------------------------------------ the command

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "margin", "score_0", "score_1", "scores_0",
                "scores_1", "scorers", "image_0_uid", "image_1_uid", "prompt_index", "seed_0", "seed_1", "source")


def pair_schema():
    """The parquet schema of a generated pair dataset (Pick-a-Pic columns first)."""
    import pyarrow as pa

    return pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                      ("label_0", pa.float64()), ("label_1", pa.float64()), ("margin", pa.float64()),
                      ("score_0", pa.float64()), ("score_1", pa.float64()), ("scores_0", pa.string()),
                      ("scores_1", pa.string()), ("scorers", pa.string()), ("image_0_uid", pa.string()),
                      ("image_1_uid", pa.string()), ("prompt_index", pa.int64()), ("seed_0", pa.int64()),
                      ("seed_1", pa.int64()), ("source", pa.string())])


def write_pairs(path: Path, rows) -> int:
    """Write pair rows (dicts with PAIR_COLUMNS; missing ones null) to one parquet file, streamed in
    row groups, under a temporary name renamed into place. Returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pair_schema()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    count, batch = 0, []
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for row in rows:
                batch.append({k: row.get(k) for k in schema.names})
                if len(batch) == 64:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    count, batch = count + len(batch), []
            if batch or count == 0:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def _uid(row: dict) -> str:
    return f"p{row['prompt_index']:05d}-s{row['seed']}"


def run_generate(config: GenerateConfig, *, extra_rows: list[dict] | None = None, scorers: dict | None = None,
                 progress: bool = True, stage: str | None = None) -> Path:
    """Sample, score and pair (see the module docstring); returns ``config.out``. `extra_rows` are
    pairs added as they are (e.g. human votes from `ncppo sbs export`); `scorers` maps names to
    already-loaded scorers (a caller running several rounds loads each once); `stage` names the
    caller's step in the progress bars."""
    from ..evaluate.sample import (DTYPES, check_sources, prompt_hash, read_index, read_prompts, run_sample,
                                   sampling_state)
    from ..manifest import write_manifest

    config.validate()
    out = Path(config.out)
    weighted = config.weighted_scorers()
    weights = {name: w for name, w, _ in weighted}
    device = _resolve_device(config.score_device)
    state = sampling_state(config.device)
    prompts = read_prompts(config.prompts, column=config.prompt_column, split=config.prompt_split,
                           unique=config.unique_prompts, limit=config.max_prompts)
    check_sources(config)
    loaded = dict(scorers or {})
    if state.is_main_process:
        # Load every scorer before hours of sampling: missing weights fail now, naming the scorer.
        from ..evaluate.score import accepted_options
        from ..evaluate.scorers import get_scorer

        for name, _w, path in weighted:
            if name not in loaded:
                loaded[name] = get_scorer(name, path, device=device, dtype=DTYPES[config.dtype],
                                          **accepted_options(name, config.options()))
    t0 = time.perf_counter()
    with _disk_full_is_a_run_error(out):
        run_sample(config.sample_config(), stage=stage)
    sampling_s = time.perf_counter() - t0
    if not state.is_main_process:
        return out
    folder = out / CANDIDATES
    index = read_index(folder)
    t1 = time.perf_counter()
    with _disk_full_is_a_run_error(out):
        raw = score_candidates(folder, index, weighted, options=config.options(), batch_size=config.score_batch_size,
                               device=device, dtype=DTYPES[config.dtype], loaded=loaded, progress=progress,
                               stage=stage)
    scoring_s = time.perf_counter() - t1

    groups = np.array([r["prompt_index"] for r in index])
    combined = combine_scores(raw, weights, groups, config.combine)
    pairs, counts = make_pairs(combined, groups, mode=config.pairs, min_margin=config.min_margin,
                               max_per_prompt=config.max_pairs_per_prompt)
    unscored = [{"file": index[i]["file"], "prompt_index": index[i]["prompt_index"], "seed": index[i]["seed"],
                 "scorers": [n for n in raw if not np.isfinite(raw[n][i])]}
                for i in np.flatnonzero(~np.isfinite(combined))]
    scorer_json = json.dumps(weights)
    if not pairs and not extra_rows:
        raise InputError(f"--out {out}: no pairs: {counts['near_ties']} near ties (margin < --min-margin "
                         f"{config.min_margin}) and {counts['candidates_unscored']} unscored candidates; lower "
                         "--min-margin, raise --per-prompt or check the scorers")

    def rows():
        for win, lose, margin in pairs:
            a, b = index[win], index[lose]
            label = soft_label(margin, config.soft_labels)
            yield dict(caption=a["prompt"], jpg_0=(folder / a["file"]).read_bytes(), jpg_1=(folder / b["file"]).read_bytes(),
                       label_0=label, label_1=1.0 - label, margin=margin, score_0=float(combined[win]),
                       score_1=float(combined[lose]),
                       scores_0=json.dumps({n: float(v[win]) for n, v in raw.items()}),
                       scores_1=json.dumps({n: float(v[lose]) for n, v in raw.items()}),
                       scorers=scorer_json, image_0_uid=_uid(a), image_1_uid=_uid(b), prompt_index=a["prompt_index"],
                       seed_0=a["seed"], seed_1=b["seed"], source="generated")
        for row in extra_rows or []:
            yield {**row, "source": row.get("source") or "votes"}

    with _disk_full_is_a_run_error(out):
        written = write_pairs(out / SHARD_NAME, rows())
    stats = {}
    for name, values in raw.items():
        ok = np.isfinite(values)
        centred = values - _group_reduce(values, groups, np.nanmean)
        stats[name] = {"mean": float(np.nanmean(values)) if ok.any() else None,
                       "within_prompt_std": float(np.sqrt(np.nanmean(centred[ok] ** 2))) if ok.any() else None}
    images = len(index)
    write_manifest(out / MANIFEST, command="data generate", config=config, seed=config.seed,
                   kind="ncppo generated pairs", model=config.model, lora=config.lora,
                   lora_sha256=config.settings()["lora_sha256"], sampler=config.settings(),
                   scorers=[{"name": n, "weight": w, "path": p} for n, w, p in weighted], combine=config.combine,
                   pairing={"mode": config.pairs, "min_margin": config.min_margin,
                            "max_pairs_per_prompt": config.max_pairs_per_prompt, "soft_labels": config.soft_labels},
                   prompt_hashes=[prompt_hash(p) for p in prompts], seeds=list(config.seeds),
                   counts={"prompts": len(prompts), "candidates": images, **counts,
                           "extra_pairs": len(extra_rows or []), "rows": written},
                   unscored={"count": len(unscored), "images": unscored[:1000]},
                   scorer_stats=stats,
                   timings={"sampling_s": sampling_s, "scoring_s": scoring_s,
                            "images_per_s_sampling": images / sampling_s if sampling_s > 0 else None,
                            "images_per_s_scoring": images / scoring_s if scoring_s > 0 else None,
                            "s_per_pair": (sampling_s + scoring_s) / max(1, counts["pairs"])})
    return out


class _disk_full_is_a_run_error:
    """A full disk while generating stops the run in one line; what is written stays (PNGs appear
    only when complete, scores and pairs by rename), so the same command continues."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunError(f"--out {self.out}: the disk is full ({err.strerror}); nothing finished is lost: free "
                           "space and rerun the same command to continue") from err
        return False


def labelling_scorers(data: str) -> list[str]:
    """The scorers that labelled a `data generate` dataset (from its manifest), or [] for other data."""
    manifest = Path(data) / MANIFEST
    if not manifest.is_file():
        return []
    try:
        record = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if record.get("kind") != "ncppo generated pairs":
        return []
    return [s["name"] for s in record.get("scorers", [])]


def run_command(config: GenerateConfig) -> tuple[Path, int]:
    """`ncppo data generate`: run, then print what was made."""
    out = run_generate(config)
    manifest = Path(out) / MANIFEST
    if manifest.is_file():
        record = json.loads(manifest.read_text())
        c = record["counts"]
        print(f"ncppo data generate: {c['pairs']} pairs from {c['candidates']} candidates of {c['prompts']} prompts "
              f"({c['near_ties']} near ties dropped, {record['unscored']['count']} unscored images) -> "
              f"{Path(out) / SHARD_NAME}")
    return out, 0
