"""`ncppo demo`: preference alignment in the toy world, latent-DPO vs NCP-DPO, on CPU.

Same code path as a real run: the shipped base loads with `from_pretrained`, the pairs are a
Pick-a-Pic-schema parquet shard, both methods train through `ncppo.train.loop.train` (LoRA,
DPO objective, `space` latent or ncp) with the same budget, and images come from
`ncppo.evaluate.sample`. Betas and learning rates are the per-space choices of `ncppo toy tune`
on the validation prompts (`TUNED`); the held-out eval prompts are used only here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..configs import option
from . import world
from .base import SHIPPED_BASE

SPACES = ("latent", "ncp")
# Chosen by `ncppo toy tune` (grid and scores in assets/tune.json, shown in every report).
TUNED = {"latent": {"beta": 100.0, "lr": 1e-3}, "ncp": {"beta": 1e6, "lr": 1e-3}}
TUNE_RECORD = Path(__file__).parent / "assets" / "tune.json"




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
    latent_beta: float = option(TUNED["latent"]["beta"], "beta of latent-DPO (from `ncppo toy tune`)")
    latent_lr: float = option(TUNED["latent"]["lr"], "learning rate of latent-DPO (from `ncppo toy tune`)")
    ncp_beta: float = option(TUNED["ncp"]["beta"], "beta of NCP-DPO (from `ncppo toy tune`)")
    ncp_lr: float = option(TUNED["ncp"]["lr"], "learning rate of NCP-DPO (from `ncppo toy tune`)")
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
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")

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


def train_config(cfg, space: str, *, model: str, data: str, out: Path, steps: int, beta: float, lr: float,
                 eval_prompts: str, eval_seeds: list[int], eval_every: int, batch_size: int | None = None,
                 sample_steps: int | None = None):
    """The TrainConfig of one toy run: LoRA DPO at 32 px with the toy judge as eval scorer."""
    from ..train.config import TrainConfig

    batch_size = batch_size or cfg.batch_size
    sample_steps = sample_steps or cfg.sample_steps
    return TrainConfig(
        model=model, data=data, output_dir=str(out), objective="dpo", space=space, beta=beta,
        finetune="lora", lora_rank=cfg.lora_rank, lora_alpha=float(cfg.lora_rank), resolution=world.RESOLUTION,
        max_steps=steps, batch_size=batch_size, learning_rate=lr, lr_scheduler="constant",
        checkpoint_every=0, report_to="none", log_every=max(1, steps // 10), seed=cfg.seed,
        sample_steps=sample_steps, guidance_scale=cfg.guidance, eval_every=eval_every,
        eval_prompts=eval_prompts, eval_scorer="toy-judge", eval_seeds=eval_seeds)


def write_prompts(path: Path, prompts: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n")
    return str(path)


def sample_and_score(model: str, lora: str | None, prompts: list[str], seeds: list[int], cfg,
                     sample_steps: int | None = None) -> tuple[list, np.ndarray]:
    import torch

    from ..evaluate.sample import load_pipeline, sample_images
    from .judge import ToyJudge

    pipe = load_pipeline(model, lora=lora, device="cuda" if torch.cuda.is_available() else "cpu")
    images = sample_images(pipe, prompts, seeds, steps=sample_steps or cfg.sample_steps, guidance=cfg.guidance,
                           height=world.RESOLUTION, width=world.RESOLUTION, batch_size=32, progress=True)
    return images, ToyJudge().score(images, prompts).numpy()


def compare(scores: dict[str, np.ndarray], n_resamples: int, seed: int) -> dict:
    """Mean judge score, win rate vs base with its paired-bootstrap 95% interval, NCP vs latent."""
    from ..evaluate.stats import paired_bootstrap_ci, win_rate

    base = scores["base"]
    out = {"base": {"mean_score": float(base.mean())}}
    for name in SPACES:
        s = scores[name]
        out[name] = {"mean_score": float(s.mean()), "win_rate_vs_base": win_rate(s, base),
                     "win_rate_vs_base_ci95": list(paired_bootstrap_ci(s, base, n_resamples=n_resamples, seed=seed))}
    out["ncp_vs_latent"] = {"win_rate": win_rate(scores["ncp"], scores["latent"]),
                            "ci95": list(paired_bootstrap_ci(scores["ncp"], scores["latent"],
                                                             n_resamples=n_resamples, seed=seed))}
    return out


def steps_to_reach(history: list[dict], target: float) -> int | None:
    """First evaluated step whose mean score reaches `target` (None if never)."""
    return next((h["step"] for h in history if h["step"] > 0 and h["mean_score"] >= target), None)


def run_demo(cfg: DemoConfig) -> dict:
    """The whole demo; returns the results dict also written to results.json."""
    from ..manifest import write_manifest
    from ..train.loop import train
    from .data import DataConfig, build_pairs
    from .figures import curve_plot, sample_grid
    from .report import write_report

    r = cfg.resolved()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.time()
    if not (Path(r["model"]) / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {r['model']}: no diffusers pipeline (model_index.json) there")

    t = time.time()
    pairs = build_pairs(DataConfig(out=str(out / "pairs"), pairs=r["pairs"], split="train", seed=cfg.seed,
                                   model=r["model"]))
    timings["data"] = time.time() - t

    eval_prompts = world.prompts("eval")
    prompts_file = write_prompts(out / "eval_prompts.txt", eval_prompts)
    curve_seeds = list(range(r["curve_seeds"]))
    runs, histories = {}, {}
    settings = {"latent": (cfg.latent_beta, cfg.latent_lr), "ncp": (cfg.ncp_beta, cfg.ncp_lr)}
    for space in SPACES:
        beta, lr = settings[space]
        t = time.time()
        result = train(train_config(cfg, space, model=r["model"], data=str(pairs), out=out / f"{space}-dpo",
                                    steps=r["steps"], beta=beta, lr=lr, eval_prompts=prompts_file,
                                    eval_seeds=curve_seeds, eval_every=r["eval_every"],
                                    batch_size=r["batch_size"], sample_steps=r["sample_steps"]))
        timings[f"train_{space}"] = time.time() - t
        runs[space] = str(result.weights_path)
        histories[space] = [{k: v for k, v in h.items() if k != "scores"} for h in result.eval_history]

    # Final comparison on seeds disjoint from the curve's.
    prompts = [p for p in eval_prompts for _ in range(r["eval_seeds"])]
    seeds = [1000 + k for _ in eval_prompts for k in range(r["eval_seeds"])]
    t = time.time()
    images, scores = {}, {}
    for name, lora in (("base", None), ("latent", runs["latent"]), ("ncp", runs["ncp"])):
        images[name], scores[name] = sample_and_score(r["model"], lora, prompts, seeds, cfg, r["sample_steps"])
    timings["evaluate"] = time.time() - t

    results = compare(scores, cfg.bootstrap, cfg.seed)
    target = histories["latent"][-1]["mean_score"] if histories["latent"] else None
    results["steps"] = r["steps"]
    results["ncp_steps_to_latent_final"] = steps_to_reach(histories["ncp"], target) if target is not None else None
    results["latent_final_curve_score"] = target
    results["curves"] = histories
    results["settings"] = {s: {"beta": b, "lr": lr} for s, (b, lr) in settings.items()}
    results["eval"] = {"prompts": eval_prompts, "seeds_per_prompt": r["eval_seeds"], "images": len(prompts)}
    timings["total"] = time.time() - t0
    results["timings_s"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2))

    columns = min(len(prompts), 12)
    pick = [i for i in range(len(prompts)) if seeds[i] - 1000 < 2][:columns]
    sample_grid({k: [images[k][i] for i in pick] for k in ("base", "latent", "ncp")},
                ["base", "latent-DPO", "NCP-DPO"]).save(out / "samples.png")
    curve_plot(histories, target).save(out / "judge_over_steps.png")
    tune = json.loads(TUNE_RECORD.read_text()) if TUNE_RECORD.is_file() else None
    write_report(out / "report.md", results, cfg, r, tune)
    write_manifest(out / "manifest.json", command="demo", config=cfg, seed=cfg.seed, resolved=r, timings_s=timings)
    print((out / "report.md").read_text())
    return results


@dataclass
class TuneConfig:
    """`ncppo toy tune`."""

    out: str = option("ncppo-tune", "output folder (tune.json, tune.md, one run per grid point)")
    steps: int = option(200, "optimizer steps per grid point")
    pairs: int = option(2000, "training pairs (train prompts)")
    seed: int = option(0, "seed of pairs, training and sampling")
    model: str | None = option(None, "base pipeline folder (default: the shipped base)")
    batch_size: int = option(16, "pairs per optimizer step")
    lora_rank: int = option(8, "LoRA rank (alpha = rank)")
    latent_betas: list[float] = option([100.0, 500.0, 2500.0], "latent-DPO betas of the grid")
    ncp_betas: list[float] = option([1e4, 1e5, 1e6], "NCP-DPO betas of the grid")
    lrs: list[float] = option([3e-4, 1e-3], "learning rates of the grid (both spaces)")
    val_seeds: int = option(4, "seeds per validation prompt")
    sample_steps: int = option(20, "DDIM steps per image")
    guidance: float = option(3.0, "classifier-free guidance scale")

    def validate(self):
        if self.steps < 1 or self.pairs < 1 or self.val_seeds < 1:
            raise ValueError("--steps, --pairs and --val-seeds must be >= 1")


def run_tune(cfg: TuneConfig) -> dict:
    """Train every (space, beta, lr) of the grid; choose per space by the final mean judge score on
    the validation prompts. Writes tune.json and tune.md; returns the record."""
    from ..manifest import write_manifest
    from ..train.loop import train
    from .data import DataConfig, build_pairs

    out = Path(cfg.out)
    model = str(cfg.model or SHIPPED_BASE)
    pairs = build_pairs(DataConfig(out=str(out / "pairs"), pairs=cfg.pairs, split="train", seed=cfg.seed, model=model))
    prompts_file = write_prompts(out / "validation_prompts.txt", world.prompts("validation"))
    grid = []
    for space, betas in (("latent", cfg.latent_betas), ("ncp", cfg.ncp_betas)):
        for beta in betas:
            for lr in cfg.lrs:
                t = time.time()
                result = train(train_config(cfg, space, model=model, data=str(pairs),
                                            out=out / f"{space}-b{beta:g}-lr{lr:g}", steps=cfg.steps, beta=beta, lr=lr,
                                            eval_prompts=prompts_file, eval_seeds=list(range(cfg.val_seeds)),
                                            eval_every=cfg.steps))
                last = result.eval_history[-1]
                grid.append(dict(space=space, beta=beta, lr=lr, mean_score=last["mean_score"],
                                 start_score=result.eval_history[0]["mean_score"],
                                 win_rate_vs_base=last.get("win_rate_vs_step0"), seconds=time.time() - t))
    chosen = {s: max((g for g in grid if g["space"] == s), key=lambda g: g["mean_score"]) for s in SPACES}
    record = dict(grid=grid, chosen={s: {"beta": c["beta"], "lr": c["lr"]} for s, c in chosen.items()},
                  steps=cfg.steps, pairs=cfg.pairs, seed=cfg.seed, val_prompts=world.prompts("validation"),
                  val_seeds=cfg.val_seeds)
    (out / "tune.json").write_text(json.dumps(record, indent=2))
    lines = ["| space | beta | lr | start score | final score | win rate vs base |", "|---|---|---|---|---|---|"]
    for g in grid:
        mark = " **(chosen)**" if chosen[g["space"]] is g else ""
        wr = "n/a" if g["win_rate_vs_base"] is None else f"{g['win_rate_vs_base']:.3f}"
        lines.append(f"| {g['space']}{mark} | {g['beta']:g} | {g['lr']:g} | {g['start_score']:.3f} | "
                     f"{g['mean_score']:.3f} | {wr} |")
    (out / "tune.md").write_text("\n".join(lines) + "\n")
    write_manifest(out / "manifest.json", command="toy tune", config=cfg, seed=cfg.seed)
    print("\n".join(lines))
    return record
