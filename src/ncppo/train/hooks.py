"""Training-time side jobs: validation image grids and reward-model evaluation.

Both run on the main process only, with the U-Net in eval mode, and return it to train mode.
"""

from __future__ import annotations

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
    """Every `eval_every` steps: mean reward of eval images and win rate against the step-0 model.

    `history` (a list kept in the trainer state, so it survives resume) receives one entry per
    evaluation with its per-image scores (the step-0 ones are what later win rates compare to).
    """

    def __init__(self, config, adapter, accelerator, history: list):
        super().__init__(config, adapter, accelerator)
        self.history = history
        self._scorer = None
        self._prompts = None

    def _setup(self):
        from ..evaluate.sample import read_prompts
        from ..evaluate.scorers import get_scorer

        if self._prompts is None:
            prompts = read_prompts(self.config.eval_prompts)
            self._prompts = [p for p in prompts for _ in self.config.eval_seeds]
            self._seeds = [s for _ in prompts for s in self.config.eval_seeds]
            self._scorer = get_scorer(self.config.eval_scorer, self.config.eval_scorer_path,
                                      device=self.accelerator.device)

    def maybe_run(self, unet, step: int) -> dict | None:
        c = self.config
        if not c.eval_every or step % c.eval_every or not self.accelerator.is_main_process:
            return None
        from ..evaluate.stats import paired_bootstrap_ci, win_rate

        self._setup()
        images = self._images(unet, self._prompts, self._seeds)
        scores = self._scorer.score(images, self._prompts).float().cpu().numpy()
        # per-image scores at every evaluation: win rates against step 0, and bands on score curves
        entry = {"step": step, "mean_score": float(scores.mean()), "scores": scores.tolist()}
        baseline = next((h["scores"] for h in self.history if h["step"] == 0), None)
        if baseline is not None and step > 0:
            base = np.asarray(baseline)
            entry["win_rate_vs_step0"] = win_rate(scores, base)
            # two-stage bootstrap: the prompts, then the seeds inside each (ncppo.evaluate.stats)
            entry["win_rate_ci"] = list(paired_bootstrap_ci(scores, base, n_resamples=2000, seed=c.seed,
                                                             groups=self._prompts))
        self.history.append(entry)
        self.accelerator.log({f"eval/{k}": v for k, v in entry.items() if isinstance(v, float)}, step=step)
        return entry
