"""`ncppo iterate`: align a model from its own samples in rounds. Round r:

  1. generate  K candidates per training prompt from the current policy (round 0: the base, or the
               --warm-start run), labelled by the scorers, paired (`data.generate.run_generate`);
  2. train     DPO (any objective, NCP or latent) on those pairs, continuing the same LoRA
               (`train.loop.train` with --init-lora; --reference previous adds --reference-lora);
  3. evaluate  the held-out --eval-prompts: proxy (labelling scorers) and gold scores, win rate
               against the base with the two-stage intervals of `ncppo compare`.

This module owns only the loop: a round's folder, the reference choice, resuming a round and the
gold guard's decision. Every phase resumes by itself (sample skips finished images, train resumes
its latest checkpoint, scores are cached), a finished round is marked by `round-<r>/round.json`,
so rerunning the same command after a kill continues where it stopped and ends with the same
weights as an uninterrupted run. Rerunning with other settings is refused (more --rounds is fine).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from ..configs import ConfigError
from ..errors import InputError, RunError
from ..manifest import atomic_write_text, write_manifest
from ..objectives import method_name
from ..train.config import TrainConfig
from .config import ROUND_OWNED, IterateConfig

ROUND_FILE = "round.json"
BASE_EVAL = "base-eval"
WARM_START = "warm-start"
BEST = "best"
MANIFEST = "iterate_manifest.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
SAMPLE_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
NOT_IDENTITY = ("rounds", "eval_per_round")  # may change between reruns of one folder


def iterate(config: IterateConfig, train_config: TrainConfig) -> dict:
    """Run (or continue) the rounds; returns the summary also written to summary.json."""
    from accelerate import PartialState

    config.validate()
    in_round(train_config).validate()
    out = Path(config.out)
    scorers = _check_inputs(config, train_config)
    state = PartialState()
    if state.is_main_process:
        _check_and_record_settings(out, config, train_config)
    state.wait_for_everyone()
    loaded = _load_scorers(config, train_config, scorers, state) if state.is_main_process else {}

    base = _evaluate(config, train_config, out / BASE_EVAL, lora=None, scorers=scorers, loaded=loaded,
                     stage="base eval")
    records: list[dict] = []
    lora = None
    if config.warm_start:
        lora, record = _warm_start(config, train_config, out, scorers, loaded, base)
        records.append(record)
    votes = _vote_rows(config) if config.votes else []
    for r in range(config.rounds):
        folder = out / f"round-{r}"
        record = _read_round(folder)
        if record is None:
            record = _run_round(config, train_config, r, folder, lora, scorers, loaded, base,
                                votes if r == config.votes_round else [], records, state)
        records.append(record)
        lora = record["lora"]
        if record.get("stop"):
            break
    summary = _summarise(config, train_config, out, base, records, scorers)
    return summary


# ------------------------------------------------------------------------------ one round

def _run_round(config, train_config, r, folder, lora, scorers, loaded, base, votes, done, state) -> dict:
    from ..data.generate import run_generate

    pairs = folder / "pairs"
    stage = f"round {r} ({r + 1}/{config.rounds})"
    method = method_name(train_config.space, train_config.objective)
    run_generate(_generate_config(config, train_config, r, pairs, lora), extra_rows=votes, scorers=loaded,
                 stage=f"{stage} generate")
    reference = lora if config.reference == "previous" else None
    weights = _train(dataclasses.replace(in_round(train_config), data=str(pairs), output_dir=str(folder / "run"),
                                         resume="latest", init_lora=lora, reference_lora=reference,
                                         # round r trains with seed + 1 + r (the warm start with seed itself)
                                         seed=train_config.seed + 1 + r,
                                         progress_desc=f"{stage} {method} train"))
    last = r == config.rounds - 1
    evaluation = (_evaluate(config, train_config, folder / "eval", lora=str(weights), scorers=scorers, loaded=loaded,
                            base=base, stage=f"{stage} eval") if config.eval_per_round or last else None)
    record = {"round": r, "lora": str(weights), "reference": reference or "base",
              "pairs": _pair_counts(pairs), "eval": evaluation}
    record["stop"] = _guard(train_config, base, done + [record])
    if state.is_main_process:
        atomic_write_text(folder / ROUND_FILE, json.dumps(record, indent=2) + "\n")
    state.wait_for_everyone()
    return record


def _warm_start(config, train_config, out, scorers, loaded, base) -> tuple[str, dict]:
    folder = out / WARM_START
    record = _read_round(folder)
    if record is None:
        method = method_name(train_config.space, train_config.objective)
        weights = _train(dataclasses.replace(in_round(train_config), data=config.warm_start,
                                             output_dir=str(folder / "run"),
                                             resume="latest", init_lora=None, reference_lora=None,
                                             progress_desc=f"warm start {method} train"))
        evaluation = _evaluate(config, train_config, folder / "eval", lora=str(weights), scorers=scorers,
                               loaded=loaded, base=base, stage="warm start eval")
        record = {"round": "warm-start", "lora": str(weights), "reference": "base", "pairs": None, "eval": evaluation,
                  "stop": None}
        atomic_write_text(folder / ROUND_FILE, json.dumps(record, indent=2) + "\n")
    return record["lora"], record


def in_round(train_config: TrainConfig) -> TrainConfig:
    """The training settings of one round: without --gold-every / --eval-every the gold scorer is
    evaluated between rounds only, so a round's own training does not carry it."""
    if train_config.gold_scorer and not (train_config.gold_every or train_config.eval_every):
        return dataclasses.replace(train_config, gold_scorer=None, gold_scorer_path=None, stop_on_gold_drop=None)
    return train_config


def _generate_config(config: IterateConfig, train_config: TrainConfig, r: int, out: Path, lora: str | None):
    """Round r's `data generate`: the training prompts, K candidates with seeds seed + r K + k."""
    from ..data.generate import GenerateConfig

    return GenerateConfig(
        model=train_config.model, prompts=config.prompts, out=str(out), lora=lora, vae=train_config.vae,
        revision=train_config.revision, variant=train_config.variant, steps=train_config.sample_steps,
        guidance=train_config.guidance_scale, scheduler=config.scheduler, height=_resolution(train_config),
        width=_resolution(train_config), batch_size=config.sample_batch_size, dtype=_sample_dtype(config, train_config),
        per_prompt=config.per_prompt, seed=train_config.seed + r * config.per_prompt, scorer=list(config.scorer),
        scorer_path=list(config.scorer_path), scorer_option=list(config.scorer_option), combine=config.combine,
        pairs=config.pairs, min_margin=config.min_margin, max_pairs_per_prompt=config.max_pairs_per_prompt,
        soft_labels=config.soft_labels, score_batch_size=config.score_batch_size)


def _train(config: TrainConfig) -> Path:
    """Train one round (or continue it from its latest checkpoint); a finished run is not redone.
    Returns the round's result weights (the best/ ones when the gold guard stopped it)."""
    from ..train.loop import train

    out = Path(config.output_dir)
    manifest = out / "manifest.json"
    if not manifest.is_file():
        result = train(config)
        if result.stopped_early and not result.gold_stopped:
            raise RunError(f"{out}: training stopped: {result.stopped_early}")
        return result.weights_path
    record = json.loads(manifest.read_text())
    if record.get("stopped_early") and not (record.get("best") or {}).get("is_result"):
        raise RunError(f"{out}: training stopped: {record['stopped_early']}")
    return Path(record["weights"])


def _resolution(train_config: TrainConfig) -> int:
    return train_config.resolution or 512


def _sample_dtype(config: IterateConfig, train_config: TrainConfig) -> str:
    return SAMPLE_DTYPES[train_config.mixed_precision] if config.sample_dtype == "auto" else config.sample_dtype


def _pair_counts(folder: Path) -> dict:
    record = json.loads((folder / "manifest.json").read_text())
    return {k: record["counts"][k] for k in ("prompts", "candidates", "pairs", "near_ties", "extra_pairs")} | {
        "unscored": record["unscored"]["count"], "sampling_s": record["timings"]["sampling_s"],
        "scoring_s": record["timings"]["scoring_s"]}


def _read_round(folder: Path) -> dict | None:
    path = folder / ROUND_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------ evaluation and the guard

def _evaluate(config, train_config, folder: Path, *, lora, scorers, loaded, base: dict | None = None,
              stage: str | None = None) -> dict:
    """Images of the held-out prompts (eval seeds) from the base + `lora`, scored by the labelling
    scorers and the gold scorer; means with intervals and, given `base`, win rates against it."""
    from ..data.generate import score_candidates
    from ..evaluate.compare import CompareConfig, compare_folders
    from ..evaluate.sample import DTYPES, SampleConfig, read_index, run_sample, sampling_state
    from ..evaluate.stats import mean_ci

    sample = SampleConfig(model=train_config.model, prompts=train_config.eval_prompts, out=str(folder), lora=lora,
                          vae=train_config.vae, revision=train_config.revision, variant=train_config.variant,
                          seeds=list(train_config.eval_seeds), steps=train_config.sample_steps,
                          guidance=train_config.guidance_scale, scheduler=config.scheduler,
                          height=_resolution(train_config), width=_resolution(train_config),
                          batch_size=config.sample_batch_size, dtype=_sample_dtype(config, train_config))
    run_sample(sample, stage=stage)
    state = sampling_state(sample.device)
    result = None
    if state.is_main_process:
        index = read_index(folder)
        raw = score_candidates(folder, index, scorers, options=dict(o.split("=", 1) for o in config.scorer_option),
                               batch_size=config.score_batch_size, device=str(state.device),
                               dtype=DTYPES[sample.dtype], loaded=loaded, progress=False,
                               stage=stage)
        groups = [r["prompt_index"] for r in index]
        result = {"folder": str(folder), "images": len(index), "scores": {}}
        for name, values in raw.items():
            mean, lo, hi = mean_ci(values, groups=groups, n_resamples=2000, seed=train_config.seed)
            result["scores"][name] = {"mean": mean, "ci95": [lo, hi]}
        if base is not None:
            compared = compare_folders(CompareConfig(dir_a=str(folder), dir_b=base["folder"], n_resamples=2000,
                                                     seed=train_config.seed, metric=[n for n, *_ in scorers]))
            result["win_rate_vs_base"] = {m: {"win_rate": v["win_rate"], "ci95": v["win_rate_ci"]}
                                          for m, v in compared["metrics"].items()}
    return _broadcast(state, result)


def _guard(train_config: TrainConfig, base: dict, records: list[dict]) -> str | None:
    """Why the rounds stop here, or None: the latest round's gold mean fell --stop-on-gold-drop or more
    below the best so far (the base and the warm start count)."""
    gold, drop = train_config.gold_scorer, train_config.stop_on_gold_drop
    if not gold or drop is None or not records or not records[-1].get("eval"):
        return None
    best = max([base["scores"][gold]["mean"]] + [r["eval"]["scores"][gold]["mean"] for r in records if r.get("eval")])
    latest = records[-1]["eval"]["scores"][gold]["mean"]
    if latest <= best - drop:
        return f"gold {gold} mean {latest:.4g} after round {records[-1]['round']} fell {drop:g} or more below its best {best:.4g}"
    return None


def _best(train_config: TrainConfig, base: dict, records: list[dict]) -> dict | None:
    """The evaluated round (or the base) with the highest gold mean; the earliest of equals."""
    gold = train_config.gold_scorer
    if not gold:
        return None
    best = {"round": "base", "lora": None, "gold": base["scores"][gold]["mean"]}
    for r in records:
        if r.get("eval") and r["eval"]["scores"][gold]["mean"] > best["gold"]:
            best = {"round": r["round"], "lora": r["lora"], "gold": r["eval"]["scores"][gold]["mean"]}
    return best


def _broadcast(state, value):
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


# ------------------------------------------------------------------------------ inputs and settings

def _check_inputs(config: IterateConfig, train_config: TrainConfig) -> list[tuple[str, float, str | None]]:
    """Fail before any work: held-out prompts given and disjoint from the training prompts, a gold
    scorer that is not a labelling scorer. Returns the scorers to evaluate with: (name, weight, path)."""
    from ..data.generate import GenerateConfig
    from ..evaluate.sample import read_prompts

    for name in ROUND_OWNED:
        default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}.get(name)
        if name not in ("data", "output_dir") and getattr(train_config, name) != default:
            raise ConfigError(f"--{name.replace('_', '-')} is set by each round of iterate; leave it out")
    if not train_config.eval_prompts:
        raise ConfigError("iterate needs held-out --eval-prompts (disjoint from --prompts) for the proxy, the gold "
                          "score and the win rate of every round")
    labelling = GenerateConfig(model=train_config.model, prompts=config.prompts, out=config.out,
                               per_prompt=config.per_prompt, scorer=list(config.scorer),
                               scorer_path=list(config.scorer_path), scorer_option=list(config.scorer_option))
    labelling.validate()
    weighted = labelling.weighted_scorers()
    if train_config.stop_on_gold_drop is not None and not train_config.gold_scorer:
        raise ConfigError("--stop-on-gold-drop needs --gold-scorer")
    if train_config.stop_on_gold_drop is not None and not train_config.stop_on_gold_drop > 0:
        raise ConfigError(f"--stop-on-gold-drop must be > 0, got {train_config.stop_on_gold_drop}")
    if train_config.gold_scorer in {n for n, *_ in weighted}:
        raise ConfigError(f"--gold-scorer {train_config.gold_scorer} is also a labelling --scorer: the gold score "
                          "must come from a scorer the training pairs were not labelled by")
    train_prompts = read_prompts(config.prompts)
    eval_prompts = read_prompts(train_config.eval_prompts)
    shared = sorted(set(train_prompts) & set(eval_prompts))
    if shared:
        raise InputError(f"--eval-prompts {train_config.eval_prompts} and --prompts {config.prompts} share "
                         f"{len(shared)} prompt(s), e.g. {shared[0]!r}: evaluation must use held-out prompts")
    if train_config.gold_scorer:
        weighted = weighted + [(train_config.gold_scorer, 0.0, train_config.gold_scorer_path)]
    return weighted


def _load_scorers(config, train_config, scorers, state) -> dict:
    """Every scorer once (labelling and gold), so rounds do not reload them."""
    from ..evaluate.sample import DTYPES
    from ..evaluate.score import accepted_options
    from ..evaluate.scorers import get_scorer

    options = dict(o.split("=", 1) for o in config.scorer_option)
    dtype = DTYPES[_sample_dtype(config, train_config)]
    loaded = {}
    for name, _w, path in scorers:
        loaded[name] = get_scorer(name, path, device=str(state.device), dtype=dtype, **accepted_options(name, options))
    return loaded


def _check_and_record_settings(out: Path, config: IterateConfig, train_config: TrainConfig) -> None:
    """Refuse to continue a folder made with other settings (more rounds is fine); else record them."""
    settings = {"iterate": dataclasses.asdict(config), "train": dataclasses.asdict(train_config)}
    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: unreadable ({err}); use another --out") from None
        for part in ("iterate", "train"):
            for key, value in settings[part].items():
                was = (old.get(part) or {}).get(key, value)
                if key not in NOT_IDENTITY and key != "progress_desc" and was != json.loads(json.dumps(value)):
                    raise InputError(f"{out} holds rounds made with other settings (--{key.replace('_', '-')}: "
                                     f"{was!r} there, {value!r} now); use another --out")
    write_manifest(path, command="iterate", config=None, seed=train_config.seed, **settings)


def _vote_rows(config: IterateConfig) -> list[dict]:
    """The --votes pairs (majority per item, ties dropped) as rows of the generated-pairs schema."""
    from ..sbs.export import ExportConfig, pair_rows

    rows, _ = pair_rows(ExportConfig(votes=list(config.votes), out=str(Path(config.out) / "votes"), drop_ties=True))
    return [dict(caption=r["caption"], jpg_0=Path(r["image_0"]).read_bytes(), jpg_1=Path(r["image_1"]).read_bytes(),
                 label_0=r["label_0"], label_1=r["label_1"], image_0_uid=r["image_0_uid"], image_1_uid=r["image_1_uid"],
                 source="votes") for r in rows]


# ------------------------------------------------------------------------------ summary

def _summarise(config, train_config, out: Path, base: dict, records: list[dict], scorers) -> dict:
    from accelerate import PartialState

    from .summary import write_summary

    best = _best(train_config, base, records)
    summary = {"base": base, "rounds": records, "best": best, "gold_scorer": train_config.gold_scorer,
               "labelling_scorers": [n for n, w, _ in scorers if w > 0],
               "stopped": next((r["stop"] for r in records if r.get("stop")), None)}
    if PartialState().is_main_process:
        if best is not None:
            _write_best(out / BEST, best)
        write_summary(out, summary)
    return summary


def _write_best(folder: Path, best: dict) -> None:
    """best/: the best round's LoRA file and best.json (the base is best: best.json only)."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if best["lora"]:
        shutil.copy2(best["lora"], tmp / LORA_FILE)
    (tmp / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
