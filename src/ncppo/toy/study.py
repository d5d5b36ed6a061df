"""`ncppo toy study`: does NCP-DPO beat latent-DPO in the toy world, and does one normalised beta
serve both spaces? One command that runs every training run of the comparison, resumably.

Phases (each skips the runs already in `results.json`, so an interrupted study loses one run):
  grid        DPO, both spaces, beta normalised by the mean reference error (`--beta-normalize`);
              one grid per space on the validation prompts (`val_seeds` images per prompt),
              widened a decade at a time while the best value sits on an edge, then refined to the
              half-decades either side of the best.
  final       each space at its own best beta, `seeds` fresh training seeds (1, 2, ...; the grid
              used seed 0), a score-over-steps curve on the held-out eval prompts and
              `eval_seeds` x 6 held-out images per model and seed.
  objectives  the transfer check: other objectives (default CPO) in both spaces at the common
              normalised beta x `objective_factors`, scored on the validation prompts.
  variants    NCP variants (timestep mode / encoder layers) at NCP's best normalised beta,
              `variant_seeds` training seeds, held-out images as in `final`.
  report      statistics (`study_report.summarise`), report.md, figures; runs whenever asked.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..configs import ConfigError, option
from . import world
from .runs import RunSpec, image_set

SPACES = ("latent", "ncp")
PHASES = ("grid", "final", "objectives", "variants", "report")
VAL_SEED0, EVAL_SEED0 = 2000, 1000  # image seeds: validation 2000.., held-out 1000.. (curves use 0..)
GRID_EXTRA_SEED0 = 10  # training seeds of the grid: 0, then 10, 11, ... (final runs use 1 .. seeds)


@dataclass
class StudyConfig:
    """`ncppo toy study`."""

    out: str = option("ncppo-study", "output folder (results.json, report.md, figures, one folder per run)")
    model: str | None = option(None, "base pipeline folder (default: the base shipped with ncppo)")
    phases: list[str] = option(list(PHASES), f"phases to run, in this order, of {', '.join(PHASES)} (each resumes "
                                             "from results.json)")
    steps: int = option(200, "optimizer steps per run")
    pairs: int = option(2000, "training pairs per training seed (train prompts)")
    batch_size: int = option(16, "pairs per optimizer step")
    lora_rank: int = option(8, "LoRA rank (alpha = rank)")
    lr: float = option(1e-3, "learning rate (constant), every run")
    beta_normalize_batches: int = option(8, "micro-batches the error scale of --beta-normalize is measured on")
    latent_grid: list[float] = option([0.1, 1.0, 10.0, 100.0, 1000.0], "initial normalised betas, latent-DPO")
    ncp_grid: list[float] = option([0.1, 1.0, 10.0, 100.0, 1000.0], "initial normalised betas, NCP-DPO")
    widen: int = option(2, "decades a grid may grow past an edge whose value is the best")
    refine: bool = option(True, "add the half-decade values (x0.3, x3) either side of each grid's best")
    grid_seeds: int = option(1, "training seeds per grid value among the --grid-top best (seed 0, then 10, 11, ...); "
                                "the best is then chosen by the mean over seeds")
    grid_top: int = option(3, "grid values (best first, by seed 0) that get the extra --grid-seeds")
    val_seeds: int = option(16, "seeds per validation prompt for grid points (x 6 prompts)")
    seeds: int = option(5, "training seeds per chosen setting (final phase)")
    eval_seeds: int = option(32, "seeds per held-out prompt for the final comparison (x 6 prompts)")
    curve_seeds: int = option(4, "seeds per held-out prompt of the score-over-steps curve")
    eval_every: int = option(25, "steps between curve points")
    objectives: list[str] = option(["cpo"], "objectives of the transfer check (besides DPO)")
    objective_factors: list[float] = option([0.1, 1.0, 10.0], "multiples of the common normalised beta tried per "
                                                              "objective and space")
    variants: list[str] = option(["uniform/down", "same/down", "t-1/mid", "t-1/multi"],
                                 "NCP variants timestep_mode/layers run beside t-1/down")
    variant_seeds: int = option(2, "training seeds per NCP variant")
    sample_steps: int = option(20, "DDIM steps per image")
    guidance: float = option(3.0, "classifier-free guidance scale")
    bootstrap: int = option(10000, "bootstrap resamples of every interval")

    def validate(self):
        for name in ("steps", "pairs", "batch_size", "val_seeds", "grid_seeds", "grid_top", "seeds", "eval_seeds", "curve_seeds",
                     "eval_every", "bootstrap", "variant_seeds", "beta_normalize_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown:
            raise ConfigError(f"--phases: unknown {unknown}; choose from {', '.join(PHASES)}")
        if self.widen < 0:
            raise ConfigError("--widen must be >= 0")
        for name in ("latent_grid", "ncp_grid", "objective_factors"):
            values = getattr(self, name)
            if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
                raise ConfigError(f"--{name.replace('_', '-')} needs positive finite values")
        for v in self.variants:
            mode, _, layers = v.partition("/")
            if mode not in ("t-1", "uniform", "same") or layers not in ("down", "mid", "multi"):
                raise ConfigError(f"--variants: {v!r} is not timestep_mode/layers (t-1|uniform|same / down|mid|multi)")


def _g(v: float) -> float:
    """A grid value to 3 significant digits (0.1 * 3 is 0.3, not 0.30000000000000004)."""
    return float(f"{v:.3g}")


class Store:
    """results.json: every finished run and the base model's scores; rewritten atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"runs": {}, "base": {}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    @property
    def runs(self) -> dict:
        return self.data["runs"]


class ToyRunner:
    """Trains a run and scores its images (the real thing; tests pass a stand-in)."""

    def __init__(self, cfg: StudyConfig, out: Path):
        from .base import SHIPPED_BASE

        self.cfg, self.out = cfg, out
        self.model = str(cfg.model or SHIPPED_BASE)
        if not (Path(self.model) / "model_index.json").is_file():
            raise FileNotFoundError(f"--model {self.model}: no diffusers pipeline (model_index.json) there")

    def pairs(self, seed: int) -> str:
        from .data import DataConfig, build_pairs

        folder = self.out / "pairs" / f"seed-{seed}"
        if not (folder / "manifest.json").is_file():
            build_pairs(DataConfig(out=str(folder), pairs=self.cfg.pairs, split="train", seed=seed, model=self.model))
        return str(folder)

    def base_scores(self, prompts: list[str], seeds: list[int], label: str = "base") -> list[float]:
        from .runs import sample_and_score

        _, scores = sample_and_score(self.model, None, prompts, seeds, sample_steps=self.cfg.sample_steps,
                                     guidance=self.cfg.guidance, progress_desc=f"{label} eval")
        return scores.tolist()

    def __call__(self, key: str, spec: RunSpec, prompts: list[str], seeds: list[int], label: str = "") -> dict:
        """Train and score one run; `label` (e.g. "[3/~20] grid latent-DPO beta 1 seed 0") names its progress bars."""
        from .runs import sample_and_score, train_run

        label = label or key
        t = time.time()
        result, beta_record = train_run(spec, model=self.model, data=self.pairs(spec.seed),
                                        out=self.out / "runs" / key.replace("/", "_"), progress_desc=f"{label} train")
        trained = time.time() - t
        _, scores = sample_and_score(self.model, str(result.weights_path), prompts, seeds,
                                     sample_steps=spec.sample_steps, guidance=spec.guidance,
                                     progress_desc=f"{label} eval")
        curve = [{"step": h["step"], "scores": h["scores"]} for h in result.eval_history]
        return dict(scores=scores.tolist(), curve=curve, beta_normalization=beta_record,
                    final_metrics=result.final_metrics, seconds_train=trained, seconds=time.time() - t)


class Study:
    def __init__(self, cfg: StudyConfig, runner=None):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.out / "results.json")
        self.runner = runner or ToyRunner(cfg, self.out)
        self.store.data["config"] = asdict(cfg)
        self.store.data.setdefault("device", _device())
        self.store.save()
        self.to_run = max(0, self.planned_runs() - sum(_phase(r) in cfg.phases for r in self.store.runs.values()))
        self.started = 0

    def planned_runs(self) -> int:
        """How many runs the requested phases hold when done (for the progress labels; an estimate:
        a grid that grows past an edge, or whose refinement values are already in it, differs)."""
        c = self.cfg
        per_phase = dict(
            grid=sum(len({_g(v) for v in getattr(c, f"{space}_grid")}) + 2 * c.refine + (c.grid_seeds - 1) * c.grid_top
                     for space in SPACES),
            final=len(SPACES) * c.seeds, objectives=len(c.objectives) * len(SPACES) * len(c.objective_factors),
            variants=len(c.variants) * c.variant_seeds)
        return sum(per_phase.get(phase, 0) for phase in c.phases)

    def label(self, spec: RunSpec, phase: str) -> str:
        """"[k/~n] <phase> <method> beta <b> seed <s>": this invocation's k-th run of about n left."""
        self.started += 1
        method = f"{'latent' if spec.space == 'latent' else 'NCP'}-{spec.objective.upper()}"
        if spec.space == "ncp" and (spec.timestep_mode, spec.ncp_layers) != ("t-1", "down"):
            method += f" {spec.timestep_mode}/{spec.ncp_layers}"
        return (f"[{self.started}/~{max(self.to_run, self.started)}] {phase} {method} beta {_g(spec.beta):g} "
                f"seed {spec.seed}")

    # ----- image sets ---------------------------------------------------------------------------
    def images(self, split: str) -> tuple[list[str], list[int]]:
        if split == "validation":
            return image_set(world.prompts("validation"), self.cfg.val_seeds, VAL_SEED0)
        return image_set(world.prompts("eval"), self.cfg.eval_seeds, EVAL_SEED0)

    def base(self, split: str) -> list[float]:
        prompts, seeds = self.images(split)
        entry = self.store.data["base"].get(split)
        if entry is None or entry["seeds"] != seeds or entry["prompts"] != prompts:
            entry = dict(prompts=prompts, seeds=seeds,
                         scores=self.runner.base_scores(prompts, seeds, label=f"[base] {split}"))
            self.store.data["base"][split] = entry
            self.store.save()
        return entry["scores"]

    # ----- one run ------------------------------------------------------------------------------
    def spec(self, space: str, beta: float, seed: int, *, objective="dpo", mode="t-1", layers="down",
             curve=False) -> RunSpec:
        c = self.cfg
        return RunSpec(space=space, beta=beta, seed=seed, objective=objective, beta_normalize=True,
                       timestep_mode=mode, ncp_layers=layers, steps=c.steps, batch_size=c.batch_size, lr=c.lr,
                       lora_rank=c.lora_rank, beta_normalize_batches=c.beta_normalize_batches,
                       sample_steps=c.sample_steps, guidance=c.guidance,
                       curve_prompts=world.prompts("eval") if curve else [],
                       curve_seeds=list(range(c.curve_seeds)) if curve else [], eval_every=c.eval_every if curve else 0)

    def run(self, phase: str, split: str, spec: RunSpec) -> dict:
        variant = "" if spec.space == "latent" else f"/{spec.timestep_mode}-{spec.ncp_layers}"
        key = f"{phase}/{spec.objective}/{spec.space}{variant}/b{_g(spec.beta):g}/s{spec.seed}"
        if key in self.store.runs:
            return self.store.runs[key]
        self.base(split)
        prompts, seeds = self.images(split)
        label = self.label(spec, phase if spec.objective == "dpo" or phase != "grid" else "objectives")
        print(f"[study] {label}: {key}", flush=True)
        record = self.runner(key, spec, prompts, seeds, label=label)
        record.update(phase=phase, split=split, spec=asdict(spec), key=key, finished=time.time())
        record["spec"].pop("curve_prompts")
        self.store.runs[key] = record
        self.store.save()
        return record

    # ----- phases -------------------------------------------------------------------------------
    def grid(self, space: str, objective: str, initial: list[float], *, widen: int, refine: bool) -> float:
        """Run (and grow) one grid on the validation prompts; returns the best normalised beta."""
        values = sorted({_g(v) for v in initial})
        grown = {"low": 0, "high": 0}

        def score(v: float) -> float:  # mean over the training seeds run so far (seed 0 first)
            self.run("grid", "validation", self.spec(space, v, 0, objective=objective))
            runs = [r for r in self.store.runs.values() if r["phase"] == "grid" and r["spec"]["space"] == space
                    and r["spec"]["objective"] == objective and _g(r["spec"]["beta"]) == v
                    and (space == "latent" or (r["spec"]["timestep_mode"], r["spec"]["ncp_layers"]) == ("t-1", "down"))]
            return _mean([_mean(r["scores"]) for r in runs])

        def best():
            scores = {v: score(v) for v in values}
            return max(values, key=lambda v: scores[v])

        top = best()
        while True:
            if top == values[0] and grown["low"] < widen:
                values.insert(0, _g(values[0] / 10))
                grown["low"] += 1
            elif top == values[-1] and grown["high"] < widen:
                values.append(_g(values[-1] * 10))
                grown["high"] += 1
            else:
                break
            top = best()
        if refine:  # the half-decades either side of the best, inside the grid's range
            low, high = values[0], values[-1]
            values = sorted(set(values) | {v for v in (_g(top * 0.3), _g(top * 3)) if low < v < high})
            top = best()
        if self.cfg.grid_seeds > 1:
            for v in sorted(values, key=score, reverse=True)[: self.cfg.grid_top]:
                for seed in range(GRID_EXTRA_SEED0, GRID_EXTRA_SEED0 + self.cfg.grid_seeds - 1):
                    self.run("grid", "validation", self.spec(space, v, seed, objective=objective))
            top = best()
        return top

    def run_phases(self) -> dict:
        from .study_report import common_beta, grid_table, write_study_report

        c = self.cfg
        chosen = {s: self.store.data.get("chosen", {}).get(s) for s in SPACES}
        for phase in c.phases:
            if phase == "grid":
                for space in SPACES:
                    chosen[space] = self.grid(space, "dpo", getattr(c, f"{space}_grid"), widen=c.widen,
                                              refine=c.refine)
                self.store.data["chosen"] = chosen
                self.store.save()
            elif phase in ("final", "variants", "objectives") and None in chosen.values():
                raise RuntimeError(f"phase {phase} needs the grid phase's chosen betas (run --phases grid first)")
            elif phase == "final":
                self.store.data["final_beta"] = dict(chosen)
                for space in SPACES:
                    for seed in range(1, c.seeds + 1):
                        self.run("final", "eval", self.spec(space, chosen[space], seed, curve=True))
            elif phase == "objectives":
                tables = {s: grid_table(self.store.data, s, "dpo") for s in SPACES}
                common = common_beta(tables)
                for objective in c.objectives:
                    for space in SPACES:
                        for f in c.objective_factors:
                            self.run("grid", "validation", self.spec(space, _g(common * f), 0, objective=objective))
            elif phase == "variants":
                for variant in c.variants:
                    mode, _, layers = variant.partition("/")
                    for seed in range(1, c.variant_seeds + 1):
                        self.run("variants", "eval", self.spec("ncp", chosen["ncp"], seed, mode=mode, layers=layers))
            elif phase == "report":
                write_study_report(self.out, self.store.data, c)
        return self.store.data


def _phase(run: dict) -> str:
    """The --phases name that made a stored run (the objectives phase stores its runs as "grid")."""
    return "objectives" if run["phase"] == "grid" and run["spec"]["objective"] != "dpo" else run["phase"]


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _device() -> dict:
    import torch

    return dict(machine=platform.machine(), processor=platform.processor() or None, cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                precision="fp32")


def run_study(cfg: StudyConfig, runner=None) -> dict:
    """Run the phases of `cfg` (resuming from results.json); returns the results."""
    from ..manifest import write_manifest

    study = Study(cfg, runner)
    data = study.run_phases()
    write_manifest(study.out / "manifest.json", command="toy study", config=cfg, seed=0)
    return data
