"""Training-time side jobs: validation image grids and reward-model evaluation.

Both run on the main process only, with the U-Net in eval mode, and return it to train mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def image_grid(images, columns: int):
    """Images of one size pasted on a grid, `columns` wide."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


class _Hook:
    def __init__(self, config, adapter, accelerator):
        self.config, self.adapter, self.accelerator = config, adapter, accelerator
        self.out = Path(config.output_dir)

    def _images(self, unet, prompts, seeds):
        from ..evaluate.sample import sample_images

        c = self.config
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                pipeline = self.adapter.build_pipeline(unet=unet)
                pipeline.set_progress_bar_config(disable=True)
                return sample_images(pipeline, prompts, seeds, steps=c.sample_steps, guidance=c.guidance_scale,
                                     height=c.resolution, width=c.resolution, batch_size=max(1, c.batch_size),
                                     progress=False)
        finally:
            unet.train(was_training)

    def _tensorboard(self):
        if self.config.report_to != "tensorboard":
            return None
        try:
            return self.accelerator.get_tracker("tensorboard", unwrap=True)
        except Exception:  # no tracker initialised (e.g. report_to none)
            return None


class ValidationHook(_Hook):
    """Every `validation_every` steps (and at the end): one image per validation prompt."""

    last_step: int | None = None

    def maybe_run(self, unet, step: int, final: bool = False) -> Path | None:
        c = self.config
        if not c.validation_prompts or not self.accelerator.is_main_process or step == self.last_step:
            return None
        if not final and not (c.validation_every and step % c.validation_every == 0):
            return None
        self.last_step = step
        images = self._images(unet, list(c.validation_prompts), c.validation_seed)
        grid = image_grid(images, columns=min(4, len(images)))
        path = self.out / "validation" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        writer = self._tensorboard()
        if writer is not None:
            writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        return path


class EvalHook(_Hook):
    """Every `eval_every` steps (the eval scorer, the proxy) and every `gold_every` steps (the gold
    scorer), and at step 0: images of the held-out eval prompts, scored; win rate against step 0.

    `history` (a list kept in the trainer state, so it survives resume) receives one entry per
    evaluation with its per-image scores (the step-0 ones are what later win rates compare to):
    `mean_score`/`scores` (eval scorer), `gold_score`/`gold_scores` (gold scorer). Each entry is
    also a row of metrics.jsonl (`kind: "eval"`) and TensorBoard's eval/ and gold/ scalars.
    """

    def __init__(self, config, adapter, accelerator, history: list):
        super().__init__(config, adapter, accelerator)
        self.history = history
        self._scorers = None
        self._prompts = None

    def due(self, step: int) -> dict[str, bool]:
        """Which scorers evaluate at `step` (the same answer on every process)."""
        c = self.config
        gold_every = c.gold_every or c.eval_every
        gold = bool(c.gold_scorer and gold_every and step % gold_every == 0)
        # the proxy (eval scorer) is scored beside every gold evaluation too
        return {"eval": bool(c.eval_scorer and (gold or (c.eval_every and step % c.eval_every == 0))), "gold": gold}

    def _setup(self):
        from ..evaluate.sample import read_prompts
        from ..evaluate.scorers import get_scorer

        if self._prompts is None:
            c = self.config
            prompts = read_prompts(c.eval_prompts)
            self._prompts = [p for p in prompts for _ in c.eval_seeds]
            self._seeds = [s for _ in prompts for s in c.eval_seeds]
            self._scorers = {}
            for key, name, path in (("eval", c.eval_scorer, c.eval_scorer_path),
                                    ("gold", c.gold_scorer, c.gold_scorer_path)):
                if name:
                    self._scorers[key] = get_scorer(name, path, device=self.accelerator.device)

    def maybe_run(self, unet, step: int) -> dict | None:
        c = self.config
        due = self.due(step)
        if not any(due.values()) or not self.accelerator.is_main_process:
            return None
        from ..evaluate.stats import paired_bootstrap_ci, win_rate

        self._setup()
        images = self._images(unet, self._prompts, self._seeds)
        entry: dict = {"step": step}
        for key, field in (("eval", "scores"), ("gold", "gold_scores")):
            if not due[key]:
                continue
            scores = self._scorers[key].score(images, self._prompts).float().cpu().numpy()
            mean_key = "mean_score" if key == "eval" else "gold_score"
            # per-image scores at every evaluation: win rates against step 0, and bands on score curves
            entry[mean_key], entry[field] = float(scores.mean()), scores.tolist()
            baseline = next((h[field] for h in self.history if h["step"] == 0 and field in h), None)
            if baseline is not None and step > 0:
                base = np.asarray(baseline)
                prefix = "" if key == "eval" else "gold_"
                entry[f"{prefix}win_rate_vs_step0"] = win_rate(scores, base)
                # two-stage bootstrap: the prompts, then the seeds inside each (ncppo.evaluate.stats)
                entry[f"{prefix}win_rate_ci"] = list(paired_bootstrap_ci(scores, base, n_resamples=2000, seed=c.seed,
                                                                         groups=self._prompts))
        self.history.append(entry)
        self._log(entry)
        return entry

    def _log(self, entry: dict) -> None:
        row = {"step": entry["step"], "kind": "eval"}
        if "mean_score" in entry:
            row["proxy_score"] = entry["mean_score"]
        if "gold_score" in entry:
            row["gold_score"] = entry["gold_score"]
            row["gold_best"] = max(h["gold_score"] for h in self.history if "gold_score" in h)
        row.update({k: v for k, v in entry.items() if k.endswith("win_rate_vs_step0")})
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        scalars = {f"eval/{k}": v for k, v in entry.items() if isinstance(v, float) and not k.startswith("gold")}
        scalars.update({f"gold/{k.removeprefix('gold_')}": v for k, v in entry.items()
                        if isinstance(v, float) and k.startswith("gold")})
        self.accelerator.log(scalars, step=entry["step"])


class GoldGuard:
    """The gold guard's decisions, read from the evaluation history (so a resumed run decides alike):
    the best gold evaluation so far, and whether the latest fell `drop` or more below it."""

    def __init__(self, drop: float | None):
        self.drop = drop

    @staticmethod
    def best(history: list[dict]) -> dict | None:
        """The evaluation with the highest gold score (the earliest of equals)."""
        scored = [h for h in history if "gold_score" in h]
        return max(scored, key=lambda h: (h["gold_score"], -h["step"])) if scored else None

    def stop_reason(self, history: list[dict]) -> str | None:
        """Why to stop now, or None: the latest gold score is `drop` or more below the best."""
        scored = [h for h in history if "gold_score" in h]
        best = self.best(history)
        if self.drop is None or not scored or best is None:
            return None
        latest = scored[-1]
        if latest["gold_score"] <= best["gold_score"] - self.drop:
            return (f"gold score {latest['gold_score']:.4g} at step {latest['step']} fell {self.drop:g} or more "
                    f"below its best {best['gold_score']:.4g} (step {best['step']}): the result is best/ "
                    f"(--stop-on-gold-drop)")
        return None
