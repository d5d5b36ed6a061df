"""CLI: `ncppo sample`, `ncppo score`, `ncppo compare` (thin: parse, validate, call the library)."""

from __future__ import annotations

import argparse

from ..configs import add_dataclass_arguments, config_from_args
from .compare import CompareConfig
from .sample import SampleConfig
from .score import ScoreConfig


def _parser(subparsers, name: str, cls, help_text: str, description: str):
    p = subparsers.add_parser(name, help=help_text, description=description)
    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML file of option values (keys = flag names); flags override it (default: none)")
    add_dataclass_arguments(p, cls)
    return p


def _sample(args):
    from .sample import run_sample

    run_sample(config_from_args(SampleConfig, args, args.config))
    return 0


def _score(args):
    from .score import run_score

    means = run_score(config_from_args(ScoreConfig, args, args.config))
    for name, value in means.items():
        print(f"{name}: mean {value:.4f}")
    return 0


def _compare(args):
    from .compare import run_compare

    run_compare(config_from_args(CompareConfig, args, args.config))  # a mismatch is an InputError
    return 0


def register(subparsers) -> None:
    p = _parser(subparsers, "sample", SampleConfig, "Generate seeded images for a prompt set.",
                "Generate one image per prompt and seed (PNG + index.jsonl), resuming where a run stopped. "
                "Run under `accelerate launch` to split the prompts across processes.")
    p.set_defaults(func=_sample)

    p = _parser(subparsers, "score", ScoreConfig, "Score a sample folder with reward models.",
                "Score every image of a sample folder; writes DIR/scores.jsonl and DIR/scores.csv.")
    p.add_argument("dir", nargs="?", default=argparse.SUPPRESS, help=ScoreConfig.__dataclass_fields__["dir"].metadata["help"])
    p.set_defaults(func=_score)

    p = _parser(subparsers, "compare", CompareConfig, "Win rate of one scored sample folder over another.",
                "Per metric: mean scores, win rate of A over B (ties count half) with a paired bootstrap interval; "
                "writes compare.json and compare.md to --out.")
    for name in ("dir_a", "dir_b"):
        p.add_argument(name, nargs="?", default=argparse.SUPPRESS,
                       help=CompareConfig.__dataclass_fields__[name].metadata["help"])
    p.set_defaults(func=_compare)
