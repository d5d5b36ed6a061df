"""`ncppo demo`: preference alignment in the toy world, latent-DPO vs NCP-DPO, on CPU.

Same code path as a real run: the shipped base loads with `from_pretrained`, the pairs are a
Pick-a-Pic-schema parquet shard, both methods train through `ncppo.train.loop.train` (LoRA,
DPO objective, `space` latent or ncp) with the same budget, and images come from
`ncppo.evaluate.sample`. Betas are the per-space choices of `ncppo toy study` on the validation
prompts (`STUDY_RECORD`, normalised by the mean reference error: `--beta-normalize`); the
held-out eval prompts are used only here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..configs import ConfigError, option
from . import world
from .base import SHIPPED_BASE

SPACES = ("latent", "ncp")
#: What `ncppo demo` runs, in order; its progress bars are labelled "[k/6] <stage>".
STAGES = ("pairs", "latent-DPO train", "NCP-DPO train", "base eval", "latent-DPO eval", "NCP-DPO eval")
STUDY_RECORD = Path(__file__).parent / "assets" / "study.json"


def study_defaults() -> dict:
    """The normalised betas per space the study's held-out phase ran (assets/study.json), or 3.0
    where none is shipped (the earlier raw tuning, latent 100 and NCP 1e6, is ~3 normalised)."""
    record = json.loads(STUDY_RECORD.read_text()) if STUDY_RECORD.is_file() else {}
    chosen = record.get("final_beta") or record.get("chosen") or {}
    return {space: float(chosen.get(space) or 3.0) for space in SPACES}


DEFAULT_BETA = study_defaults()


@dataclass
class DemoConfig:
    """`ncppo demo`."""

    out: str = option("ncppo-demo", "output folder (report.md, results.json, figures, runs)")
    quick: bool = option(False, "about a minute: 10 steps of 8 pairs, 10 DDIM steps, fewer eval images (for CI)")
    steps: int | None = option(None, "optimizer steps per method (default 200; --quick 10)")
    seed: int = option(0, "seed of the pairs, training and sampling")
    model: str | None = option(None, "base pipeline folder (default: the base shipped with ncppo)")
    pairs: int | None = option(None, "number of training pairs (default 2000; --quick 100)")
    batch_size: int = option(16, "pairs per optimizer step (--quick: at most 8)")
    lora_rank: int = option(8, "LoRA rank (alpha = rank)")
    beta_normalize: bool = option(True, "betas in units of the mean reference error (train --beta-normalize); "
                                        "false: raw betas")
    latent_beta: float = option(DEFAULT_BETA["latent"], "beta of latent-DPO (default: `ncppo toy study`'s choice)")
    ncp_beta: float = option(DEFAULT_BETA["ncp"], "beta of NCP-DPO (default: `ncppo toy study`'s choice)")
    lr: float = option(1e-3, "learning rate of both methods (constant)")
    eval_seeds: int | None = option(None, "seeds per held-out prompt in the final comparison (default 16; --quick 2)")
    curve_seeds: int | None = option(None, "seeds per held-out prompt in the score-over-steps curve (default 4; --quick 1)")
    eval_every: int | None = option(None, "steps between curve points (default steps/8)")
    sample_steps: int = option(20, "DDIM steps per image (--quick: at most 10)")
    guidance: float = option(3.0, "classifier-free guidance scale")
    bootstrap: int = option(10000, "bootstrap resamples of the 95%% intervals")

    def validate(self):
        for name in ("steps", "pairs", "eval_seeds", "curve_seeds", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")

    def resolved(self) -> dict:
        """Every setting with the --quick / default choices filled in."""
        q = self.quick
        steps = self.steps or (10 if q else 200)
        return dict(steps=steps, pairs=self.pairs or (100 if q else 2000),
                    eval_seeds=self.eval_seeds or (2 if q else 16), curve_seeds=self.curve_seeds or (1 if q else 4),
                    eval_every=self.eval_every or max(1, steps // (1 if q else 8)),
                    batch_size=min(self.batch_size, 8) if q else self.batch_size,
                    sample_steps=min(self.sample_steps, 10) if q else self.sample_steps,
                    model=str(self.model or SHIPPED_BASE))


def stage(name: str) -> str:
    """The progress-bar label of one demo stage: stage("NCP-DPO eval") == "[6/6] NCP-DPO eval"."""
    from .runs import stage_label

    return stage_label(STAGES.index(name) + 1, len(STAGES), name)


def compare(scores: dict[str, np.ndarray], n_resamples: int, seed: int, groups=None) -> dict:
    """Mean judge score, win rate vs base and NCP vs latent, with 95% intervals (two-stage
    bootstrap over `groups`, the prompt of each image)."""
    from ..evaluate.stats import mean_ci, paired_bootstrap_ci, win_rate

    kw = dict(n_resamples=n_resamples, seed=seed, groups=groups)
    base = scores["base"]
    out = {"base": {"mean_score": float(base.mean()), "mean_score_ci95": list(mean_ci(base, **kw)[1:])}}
    for name in SPACES:
        s = scores[name]
        out[name] = {"mean_score": float(s.mean()), "mean_score_ci95": list(mean_ci(s, **kw)[1:]),
                     "win_rate_vs_base": win_rate(s, base),
                     "win_rate_vs_base_ci95": list(paired_bootstrap_ci(s, base, **kw))}
    out["ncp_vs_latent"] = {"win_rate": win_rate(scores["ncp"], scores["latent"]),
                            "ci95": list(paired_bootstrap_ci(scores["ncp"], scores["latent"], **kw))}
    return out


def curve_points(history: list[dict], prompts: list[str], n_resamples: int, seed: int) -> list[dict]:
    """Per evaluated step: mean held-out score with its 95% interval (prompts, then seeds)."""
    from ..evaluate.stats import mean_ci

    out = []
    for h in history:
        point = {"step": h["step"], "mean_score": h["mean_score"]}
        if h.get("scores") and len(h["scores"]) == len(prompts):
            _, lo, hi = mean_ci(h["scores"], groups=prompts, n_resamples=n_resamples, seed=seed)
            point["ci95"] = [lo, hi]
        out.append(point)
    return out


def steps_to_reach(history: list[dict], target: float) -> int | None:
    """First evaluated step whose mean score reaches `target` (None if never)."""
    return next((h["step"] for h in history if h["step"] > 0 and h["mean_score"] >= target), None)


def curve_figure(path, results: dict):
    """judge_over_steps.png from a demo's results.json: the held-out score curves with their 95%
    bands and latent-DPO's final score (docs/toy/ is redrawn this way from its results.json)."""
    from .figures import score_curves

    curves = results["curves"]
    return score_curves(path, {s: [(p["step"], p["mean_score"], *p.get("ci95", (None, None))) for p in curves[s]]
                               for s in SPACES}, results.get("latent_final_curve_score"),
                        title="held-out prompts, 95% band over prompts then seeds",
                        ylabel=f"mean toy-judge score ({results['eval']['curve_images']} images a point)")


def run_demo(cfg: DemoConfig) -> dict:
    """The whole demo; returns the results dict also written to results.json."""
    from ..manifest import write_manifest
    from .data import DataConfig, build_pairs
    from .figures import NAMES, sample_grid
    from .report import write_report
    from .runs import RunSpec, image_set, sample_and_score, train_run

    r = cfg.resolved()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.time()
    if not (Path(r["model"]) / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {r['model']}: no diffusers pipeline (model_index.json) there")

    t = time.time()
    pairs = build_pairs(DataConfig(out=str(out / "pairs"), pairs=r["pairs"], split="train", seed=cfg.seed,
                                   model=r["model"], progress_desc=stage("pairs")))
    timings["data"] = time.time() - t

    eval_prompts = world.prompts("eval")
    curve_seeds = list(range(r["curve_seeds"]))
    curve_prompts = [p for p in eval_prompts for _ in curve_seeds]
    runs, histories, scales = {}, {}, {}
    betas = {"latent": cfg.latent_beta, "ncp": cfg.ncp_beta}
    for space in SPACES:
        spec = RunSpec(space=space, beta=betas[space], seed=cfg.seed, beta_normalize=cfg.beta_normalize,
                       steps=r["steps"], batch_size=r["batch_size"], lr=cfg.lr, lora_rank=cfg.lora_rank,
                       sample_steps=r["sample_steps"], guidance=cfg.guidance, curve_prompts=eval_prompts,
                       curve_seeds=curve_seeds, eval_every=r["eval_every"])
        t = time.time()
        result, scales[space] = train_run(spec, model=r["model"], data=str(pairs), out=out / f"{space}-dpo",
                                          progress_desc=stage(f"{NAMES[space]} train"))
        timings[f"train_{space}"] = time.time() - t
        runs[space] = str(result.weights_path)
        histories[space] = curve_points(result.eval_history, curve_prompts, min(cfg.bootstrap, 2000), cfg.seed)

    # Final comparison on seeds disjoint from the curve's.
    prompts, seeds = image_set(eval_prompts, r["eval_seeds"], 1000)
    t = time.time()
    images, scores = {}, {}
    for name, lora in (("base", None), ("latent", runs["latent"]), ("ncp", runs["ncp"])):
        images[name], scores[name] = sample_and_score(r["model"], lora, prompts, seeds,
                                                      sample_steps=r["sample_steps"], guidance=cfg.guidance,
                                                      progress_desc=stage(f"{NAMES.get(name, name)} eval"))
    timings["evaluate"] = time.time() - t

    results = compare(scores, cfg.bootstrap, cfg.seed, groups=prompts)
    target = histories["latent"][-1]["mean_score"] if histories["latent"] else None
    results["steps"] = r["steps"]
    results["ncp_steps_to_latent_final"] = steps_to_reach(histories["ncp"], target) if target is not None else None
    results["latent_final_curve_score"] = target
    results["curves"] = histories
    results["settings"] = {s: {"beta": betas[s], "beta_normalize": cfg.beta_normalize, "lr": cfg.lr,
                               "error_scale": (scales[s] or {}).get("error_scale"),
                               "effective_beta": (scales[s] or {}).get("effective_beta", betas[s])} for s in SPACES}
    results["eval"] = {"prompts": eval_prompts, "seeds_per_prompt": r["eval_seeds"], "images": len(prompts),
                       "curve_images": len(curve_prompts)}
    timings["total"] = time.time() - t0
    results["timings_s"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2))

    pick = [prompts.index(p) for p in eval_prompts] + [prompts.index(p) + 1 for p in eval_prompts if r["eval_seeds"] > 1]
    pick = sorted(pick)[:12]
    sample_grid({k: [images[k][i] for i in pick] for k in ("base", "latent", "ncp")},
                ["base", "latent-DPO", "NCP-DPO"],
                columns=[f"{prompts[i].removeprefix('a ').replace(' background', '')} #{seeds[i]}" for i in pick]
                ).save(out / "samples.png")
    curve_figure(out / "judge_over_steps.png", results)
    study = json.loads(STUDY_RECORD.read_text()) if STUDY_RECORD.is_file() else None
    write_report(out / "report.md", results, cfg, r, study)
    write_manifest(out / "manifest.json", command="demo", config=cfg, seed=cfg.seed, resolved=r, timings_s=timings)
    print((out / "report.md").read_text())
    return results
