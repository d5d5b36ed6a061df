"""`ncppo toy online`: on-policy rounds against the fixed toy pairs, and the gold guard against a
hackable proxy, in the toy world, with several training seeds. Resumable: every run is recorded in
results.json as it finishes (and each run resumes itself), so an interrupted study loses little.

Parts:
  compare  offline (the toy's fixed, rendered, judge-labelled pairs) against on-policy `iterate`
           (`rounds` rounds labelled by the judge), in latent and in NCP space, at equal optimizer
           steps (rounds x steps_per_round) and equal images (offline: rounds x 24 prompts x K / 2
           pairs = as many rendered images as the rounds sample).
  hack     `iterate` labelled by `toy-proxy` (the judge with a blind spot for oversized shapes) with
           the judge as gold, `hack_rounds` rounds, without and with --stop-on-gold-drop.
Every model is scored by the judge on the same held-out images (6 eval prompts x eval_seeds); the
intervals are the two-stage bootstrap of `ncppo compare`, training seeds and prompts crossed when
seeds are pooled (`study_report.pooled`, `head_to_head`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..configs import ConfigError, option
from . import world
from .demo import DEFAULT_BETA
from .study_report import NAMES

SPACES = ("latent", "ncp")
PARTS = ("compare", "hack")
EVAL_SEED0 = 1000  # held-out image seeds of the final comparison (curves use 0 ..)


@dataclass
class OnlineConfig:
    """`ncppo toy online`."""

    out: str = option("ncppo-online", "output folder (results.json, report.md, figures, one folder per run)")
    model: str | None = option(None, "base pipeline folder (default: the base shipped with ncppo)")
    parts: list[str] = option(list(PARTS), "parts to run: compare (offline vs on-policy, both spaces) and hack (the "
                                           "gold guard against toy-proxy); each resumes from results.json")
    seeds: int = option(5, "training seeds per arm")
    rounds: int = option(3, "on-policy rounds of the compare part")
    steps_per_round: int = option(50, "optimizer steps per round (offline runs: rounds x this)")
    per_prompt: int = option(8, "candidates K per training prompt and round")
    max_pairs_per_prompt: int = option(8, "pairs per prompt and round (all pairs, largest margins first)")
    hack_rounds: int = option(5, "rounds of the hack part")
    hack_space: str = option("ncp", "space of the hack part", choices=SPACES)
    gold_drop: float = option(0.3, "--stop-on-gold-drop of the guarded hack runs (judge points)")
    batch_size: int = option(16, "pairs per optimizer step")
    lora_rank: int = option(8, "LoRA rank (alpha = rank)")
    lr: float = option(1e-3, "learning rate (constant)")
    latent_beta: float = option(DEFAULT_BETA["latent"], "normalised beta of latent-DPO (the study's choice)")
    ncp_beta: float = option(DEFAULT_BETA["ncp"], "normalised beta of NCP-DPO (the study's choice)")
    eval_seeds: int = option(16, "seeds per held-out prompt of the final comparison (x 6 prompts)")
    curve_seeds: int = option(4, "seeds per held-out prompt of the per-round curves")
    sample_steps: int = option(20, "DDIM steps per image")
    guidance: float = option(3.0, "classifier-free guidance scale")
    bootstrap: int = option(4000, "bootstrap resamples of every interval")
    quick: bool = option(False, "a smoke run for tests: 1 seed, 2 rounds of 2 steps, K 2, 1 image per prompt")

    def validate(self):
        for name in ("seeds", "rounds", "steps_per_round", "hack_rounds", "batch_size", "eval_seeds", "curve_seeds",
                     "max_pairs_per_prompt", "bootstrap"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.per_prompt < 2:
            raise ConfigError("--per-prompt must be >= 2")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise ConfigError(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
        if not self.gold_drop > 0:
            raise ConfigError("--gold-drop must be > 0")

    def resolved(self) -> "OnlineConfig":
        if not self.quick:
            return self
        return dataclasses.replace(self, seeds=1, rounds=2, steps_per_round=2, per_prompt=2, max_pairs_per_prompt=1,
                                   hack_rounds=2, batch_size=4, eval_seeds=1, curve_seeds=1, sample_steps=2,
                                   bootstrap=200, quick=False)


class OnlineStudy:
    def __init__(self, cfg: OnlineConfig):
        from .base import SHIPPED_BASE

        self.cfg = cfg.resolved()
        self.out = Path(cfg.out)
        self.model = str(cfg.model or SHIPPED_BASE)
        self.path = self.out / "results.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"runs": {}}
        self.eval_prompts = world.prompts("eval")
        self.prompts_file = self._write("prompts-eval.txt", self.eval_prompts)
        self.train_file = self._write("prompts-train.txt", world.prompts("train"))

    def _write(self, name: str, prompts: list[str]) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / name).write_text("\n".join(prompts) + "\n")
        return str(self.out / name)

    def _save(self) -> None:
        from ..manifest import atomic_write_text

        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")

    # ---------------------------------------------------------------- shared pieces
    def _final_images(self):
        from .runs import image_set

        return image_set(self.eval_prompts, self.cfg.eval_seeds, EVAL_SEED0)

    def _score(self, lora: str | None, scorers=("toy-judge",)) -> dict:
        """Judge (and proxy) scores of the final held-out images of base + `lora`."""
        from .judge import ToyProxyJudge
        from .runs import sample_and_score

        prompts, seeds = self._final_images()
        images, judge = sample_and_score(self.model, lora, prompts, seeds, sample_steps=self.cfg.sample_steps,
                                         guidance=self.cfg.guidance)
        out = {"toy-judge": judge.tolist()}
        if "toy-proxy" in scorers:
            out["toy-proxy"] = ToyProxyJudge().score(images, prompts).tolist()
        return out

    def base(self) -> dict:
        if "base" not in self.data:
            prompts, _ = self._final_images()
            self.data["base"] = {"prompts": prompts, **self._score(None, ("toy-judge", "toy-proxy"))}
            self._save()
        b = self.data["base"]
        return {"prompts": b["prompts"], "scores": b["toy-judge"], "proxy": b["toy-proxy"]}

    def _train_config(self, space: str, seed: int, out: Path, **extra):
        from ..train.config import TrainConfig

        c = self.cfg
        return TrainConfig(model=self.model, data=str(out), output_dir=str(out), objective="dpo", space=space,
                           beta=c.latent_beta if space == "latent" else c.ncp_beta, beta_normalize=True,
                           finetune="lora", lora_rank=c.lora_rank, lora_alpha=float(c.lora_rank),
                           resolution=world.RESOLUTION, batch_size=c.batch_size, learning_rate=c.lr,
                           lr_scheduler="constant", checkpoint_every=c.steps_per_round, report_to="none",
                           log_every=max(1, c.steps_per_round // 5), seed=seed, sample_steps=c.sample_steps,
                           guidance_scale=c.guidance, eval_prompts=self.prompts_file,
                           eval_seeds=list(range(c.curve_seeds)), **extra)

    def _iterate(self, space: str, seed: int, folder: Path, *, scorer: str, rounds: int, gold: str | None = None,
                 drop: float | None = None) -> dict:
        """One on-policy run; returns its result LoRA, per-round curve (judge and proxy scores)."""
        from ..online.config import IterateConfig
        from ..online.rounds import iterate

        c = self.cfg
        train = self._train_config(space, seed, folder, max_steps=c.steps_per_round, gold_scorer=gold,
                                   stop_on_gold_drop=drop)
        summary = iterate(IterateConfig(prompts=self.train_file, out=str(folder), rounds=rounds, per_prompt=c.per_prompt,
                                        scorer=[scorer], pairs="all", max_pairs_per_prompt=c.max_pairs_per_prompt,
                                        min_margin=0.1, sample_batch_size=32, score_batch_size=64), train)
        curve = [{"step": 0, **_round_scores(folder / "base-eval")}]
        for r in summary["rounds"]:
            if r.get("eval"):
                curve.append({"step": (r["round"] + 1) * c.steps_per_round, **_round_scores(Path(r["eval"]["folder"]))})
        best = summary.get("best")
        result = best["lora"] if best is not None and drop is not None else summary["rounds"][-1]["lora"]
        return {"lora": result, "curve": curve, "rounds_run": len(summary["rounds"]), "stopped": summary.get("stopped"),
                "best_round": None if best is None else best["round"]}

    # ---------------------------------------------------------------- parts
    def run_compare(self) -> None:
        c = self.cfg
        for seed in range(1, c.seeds + 1):
            for space in SPACES:
                for arm in ("offline", "online"):
                    key = f"{arm}-{space}-s{seed}"
                    if key in self.data["runs"]:
                        continue
                    t0 = time.time()
                    folder = self.out / "runs" / key
                    run = self._offline(space, seed, folder) if arm == "offline" else self._iterate(
                        space, seed, folder, scorer="toy-judge", rounds=c.rounds)
                    run.update(scores=self._score(run["lora"])["toy-judge"],
                               spec={"arm": arm, "space": space, "seed": seed,
                                     "beta": c.latent_beta if space == "latent" else c.ncp_beta},
                               seconds=time.time() - t0)
                    self.data["runs"][key] = run
                    self._save()

    def _offline(self, space: str, seed: int, folder: Path) -> dict:
        """Fixed toy pairs (as many rendered images as the online rounds sample), rounds x steps_per_round steps."""
        from ..train.loop import train
        from .data import DataConfig, build_pairs

        c = self.cfg
        pairs = c.rounds * len(world.prompts("train")) * c.per_prompt // 2
        data = build_pairs(DataConfig(out=str(folder / "pairs"), pairs=pairs, split="train", seed=seed,
                                      model=self.model))
        config = self._train_config(space, seed, folder / "run", max_steps=c.rounds * c.steps_per_round,
                                    eval_every=c.steps_per_round, eval_scorer="toy-judge", resume="latest")
        result = train(dataclasses.replace(config, data=str(data), progress_desc=f"offline {NAMES[space]} s{seed}"))
        curve = [{"step": h["step"], "toy-judge": h["scores"]} for h in result.eval_history]
        return {"lora": str(result.weights_path), "curve": curve, "pairs": pairs}

    def run_hack(self) -> None:
        c = self.cfg
        for seed in range(1, c.seeds + 1):
            for arm, drop in (("unguarded", None), ("guarded", c.gold_drop)):
                key = f"hack-{arm}-s{seed}"
                if key in self.data["runs"]:
                    continue
                t0 = time.time()
                run = self._iterate(c.hack_space, seed, self.out / "runs" / key, scorer="toy-proxy",
                                    rounds=c.hack_rounds, gold="toy-judge", drop=drop)
                final = self._score(run["lora"], ("toy-judge", "toy-proxy"))
                run.update(scores=final["toy-judge"], proxy=final["toy-proxy"],
                           spec={"arm": f"hack-{arm}", "space": c.hack_space, "seed": seed, "drop": drop,
                                 "beta": c.ncp_beta if c.hack_space == "ncp" else c.latent_beta},
                           seconds=time.time() - t0)
                self.data["runs"][key] = run
                self._save()


def _round_scores(folder: Path) -> dict:
    """Per-image judge and proxy scores of an iterate eval folder (prompt-major, as sampled)."""
    from ..evaluate.score import read_scores

    rows = sorted(read_scores(folder), key=lambda r: (r["prompt_index"], r["seed"]))
    return {name: [r[name] for r in rows] for name in ("toy-judge", "toy-proxy") if rows and name in rows[0]}


def run_online(cfg: OnlineConfig) -> dict:
    """Run the asked parts, then write report.md, summary.json and figures in `cfg.out`."""
    from .online_report import write_online_report

    cfg.validate()
    study = OnlineStudy(cfg)
    study.base()
    if "compare" in cfg.parts:
        study.run_compare()
    if "hack" in cfg.parts:
        study.run_hack()
    summary = write_online_report(study.out, study.data, study.cfg)
    print((study.out / "report.md").read_text())
    return summary
