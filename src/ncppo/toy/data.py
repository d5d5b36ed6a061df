"""Pick-a-Pic-schema preference pairs from the toy world, labelled by the toy judge.

Each row: one prompt of a split, two off-policy renders of it with independent random flaws
(`PAIR_FLAW_RATES`; as Pick-a-Pic's images come from other models than SD1.5), the judge's scores
s0, s1 and a Bradley-Terry label: a tie (0.5) when |s0 - s1| < tie_margin, else image 0 wins
with probability sigmoid((s0 - s1) / temperature). Written as a parquet shard
(`train-00000-of-00001.parquet`; columns caption, jpg_0, jpg_1 (PNG bytes), label_0, label_1,
image_0_uid, image_1_uid, plus score_0/score_1) that `ncppo.data.pairs.open_pairs` reads, with a
manifest.json beside it.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import world
from .judge import judge_score, proxy_score

PAIR_FLAW_RATES: dict[str, float] = {
    "colour": 0.5, "shape": 0.25, "background": 0.1, "offcentre": 0.25, "size": 0.25, "blur": 0.2, "speckle": 0.2,
}
SHARD_NAME = "train-00000-of-00001.parquet"


@dataclass
class DataConfig:
    """`ncppo toy data`: make Pick-a-Pic-schema pairs of toy-world renders labelled by the judge."""

    out: str = field(metadata={"help": "output folder (one parquet shard + manifest.json)"})
    pairs: int = field(default=2000, metadata={"help": "number of pairs"})
    split: str = field(default="train", metadata={"help": "prompt split the captions come from",
                                                  "choices": ["train", "validation", "eval", "all"]})
    seed: int = field(default=0, metadata={"help": "seed of prompts, renders and labels"})
    temperature: float = field(default=0.5, metadata={"help": "Bradley-Terry temperature of the labels "
                                                              "(judge-score units); 0 = always the higher score"})
    tie_margin: float = field(default=0.1, metadata={"help": "score difference below which a pair is a tie"})
    labeller: str = field(default="toy-judge", metadata={
        "help": "who labels the pairs: toy-judge, or toy-proxy (the judge with a blind spot for oversized shapes: "
                "pairs for reward-hacking studies)", "choices": ["toy-judge", "toy-proxy"]})
    model: str | None = field(default=None, metadata={"help": "recorded in the manifest only: the base the "
                                                               "pairs are meant for (renders are off-policy)"})
    progress_desc: str = field(default="toy pairs", metadata={"help": "progress bar label", "cli": False})

    def validate(self):
        if self.pairs < 1:
            raise ValueError("--pairs must be >= 1")
        if self.temperature < 0 or self.tie_margin < 0:
            raise ValueError("--temperature and --tie-margin must be >= 0")


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bradley_terry_label(s0: float, s1: float, u: float, temperature: float, tie_margin: float) -> float:
    """label_0 for scores s0, s1 given a uniform draw u in [0, 1)."""
    if abs(s0 - s1) < tie_margin:
        return 0.5
    if temperature == 0:
        return 1.0 if s0 > s1 else 0.0
    p0 = 1.0 / (1.0 + math.exp(-(s0 - s1) / temperature))
    return 1.0 if u < p0 else 0.0


def make_rows(cfg: DataConfig) -> list[dict]:
    """The rows of `cfg.pairs` pairs (deterministic given cfg.seed)."""
    prompt_list = world.prompts(cfg.split)
    rng = np.random.default_rng(cfg.seed)
    score = proxy_score if cfg.labeller == "toy-proxy" else judge_score
    rows = []
    for i in tqdm(range(cfg.pairs), desc=cfg.progress_desc, leave=False):
        prompt = prompt_list[int(rng.integers(len(prompt_list)))]
        seeds = rng.integers(2**31, size=2)
        flaws = [world.random_flaws(rng, PAIR_FLAW_RATES) for _ in range(2)]
        images = [world.render_prompt(prompt, int(s), f) for s, f in zip(seeds, flaws)]
        scores = [score(im, prompt) for im in images]
        label = bradley_terry_label(scores[0], scores[1], float(rng.random()), cfg.temperature, cfg.tie_margin)
        rows.append(dict(caption=prompt, jpg_0=png_bytes(images[0]), jpg_1=png_bytes(images[1]),
                         label_0=label, label_1=1.0 - label,
                         image_0_uid=f"toy-{cfg.seed}-{i}-0", image_1_uid=f"toy-{cfg.seed}-{i}-1",
                         score_0=scores[0], score_1=scores[1],
                         flaws_0=",".join(flaws[0]), flaws_1=",".join(flaws[1])))
    return rows


def label_stats(rows: list[dict]) -> dict:
    labels = np.array([r["label_0"] for r in rows])
    s0, s1 = np.array([r["score_0"] for r in rows]), np.array([r["score_1"] for r in rows])
    decided = labels != 0.5
    agree = ((labels == 1.0) == (s0 > s1))[decided]
    return dict(pairs=len(rows), ties=int((~decided).sum()), label_0_wins=int((labels == 1.0).sum()),
                label_agrees_with_judge=float(agree.mean()) if agree.size else float("nan"),
                mean_abs_score_gap=float(np.abs(s0 - s1).mean()))


def build_pairs(cfg: DataConfig) -> Path:
    """Write the pairs of `cfg` to `cfg.out` (parquet shard + manifest.json); returns the folder."""
    import datasets

    from ..manifest import write_manifest

    t0 = time.time()
    rows = make_rows(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({
        "caption": datasets.Value("string"), "jpg_0": datasets.Value("binary"), "jpg_1": datasets.Value("binary"),
        "label_0": datasets.Value("float64"), "label_1": datasets.Value("float64"),
        "image_0_uid": datasets.Value("string"), "image_1_uid": datasets.Value("string"),
        "score_0": datasets.Value("float64"), "score_1": datasets.Value("float64"),
        "flaws_0": datasets.Value("string"), "flaws_1": datasets.Value("string")})
    ds = datasets.Dataset.from_list(rows, features=features)
    ds.to_parquet(str(out / SHARD_NAME))
    write_manifest(out / "manifest.json", command="toy data", config=cfg, kind="ncppo toy pairs",
                   flaw_rates=PAIR_FLAW_RATES, prompts=world.prompts(cfg.split), stats=label_stats(rows),
                   seconds=time.time() - t0)
    return out
