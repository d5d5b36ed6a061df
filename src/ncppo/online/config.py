"""`IterateConfig`: the knobs of `ncppo iterate` that are not `ncppo train`'s (which it takes too).

Field = YAML key = `--flag`. The training settings of every round are a `TrainConfig` (its flags:
`--max-steps` is the optimizer steps of one round; `--eval-prompts`, `--gold-scorer` and
`--stop-on-gold-drop` are the held-out evaluation and the guard, per round and within it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..configs import ConfigError, option
from ..data.generate import COMBINE, PAIRING

# TrainConfig fields a round sets itself (not flags of `ncppo iterate`).
ROUND_OWNED = ("data", "output_dir", "resume", "resume_anyway", "init_lora", "reference_lora")


@dataclass
class IterateConfig:
    prompts: str = field(metadata={"help": "training prompts: .txt (one a line), .csv/.jsonl/.json/.parquet column, "
                                           "datasets folder or id; must not overlap --eval-prompts"})
    out: str = field(metadata={"help": "output folder: round-<r>/{pairs,run,eval}, base-eval/, best/, summary.md/.json/.png"})
    rounds: int = option(3, "rounds of generate -> train -> evaluate")
    reference: str = option("base", "DPO reference of a round: base (a fixed anchor) or previous (the previous round's "
                                    "policy: iterative DPO, a fresh trust region each round)", choices=("base", "previous"))
    warm_start: str | None = option(None, "pair data (any `train --data` source, e.g. curated Pick-a-Pic) trained on "
                                          "first, with the same settings; round 0 then samples from that policy")
    votes: list[str] = option([], "vote logs of `ncppo sbs serve`, comma-separated: their pairs (majority per item, ties "
                                  "dropped) are added to round --votes-round's data")
    votes_round: int = option(0, "the round whose data gets the --votes pairs")
    per_prompt: int = option(4, "candidates K per training prompt and round (>= 2)")
    scorer: list[str] = option(["pickscore"], "labelling scorers NAME[:WEIGHT], comma-separated (see `ncppo data "
                                              "generate --help`); their mean on --eval-prompts is the proxy reward")
    scorer_path: list[str] = option([], "weights per labelling scorer, comma-separated in --scorer order; 'default' "
                                        "keeps one's default")
    scorer_option: list[str] = option([], "scorer options KEY=VALUE, comma-separated")
    combine: str = option("zscore", "how several scorers make one score (see `ncppo data generate`)", choices=COMBINE)
    pairs: str = option("best-worst", "pairs per prompt: best-worst or all (see `ncppo data generate`)", choices=PAIRING)
    min_margin: float = option(0.1, "keep a pair only if its combined-score margin is at least this (near ties dropped)")
    max_pairs_per_prompt: int | None = option(None, "at most this many pairs per prompt and round")
    soft_labels: float | None = option(None, "temperature T: label_0 = sigmoid(margin / T) instead of hard labels")
    scheduler: str = option("default", "sampler of candidates and eval images (`ncppo sample --scheduler` names)")
    sample_batch_size: int = option(8, "images per pipeline call when sampling candidates and eval images")
    score_batch_size: int = option(16, "images per scorer call")
    sample_dtype: str = option("auto", "weights dtype when sampling: auto = as --mixed-precision (bf16 -> bfloat16, "
                                       "fp16 -> float16, no -> float32)", choices=("auto", "float32", "float16", "bfloat16"))
    eval_per_round: bool = option(True, "score the held-out --eval-prompts after every round (proxy, gold, win rate vs "
                                        "base); false: only after the last")

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if self.per_prompt < 2:
            raise ConfigError(f"--per-prompt must be >= 2 (a pair needs two candidates), got {self.per_prompt}")
        if not 0 <= self.votes_round < self.rounds:
            raise ConfigError(f"--votes-round must be a round, 0 .. {self.rounds - 1}, got {self.votes_round}")
        if not (math.isfinite(self.min_margin) and self.min_margin >= 0):
            raise ConfigError(f"--min-margin must be >= 0, got {self.min_margin}")
        for name in ("sample_batch_size", "score_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
