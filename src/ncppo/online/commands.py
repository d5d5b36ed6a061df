"""`ncppo iterate`: its own flags and every `ncppo train` flag (a round's training settings)."""

from __future__ import annotations

import dataclasses

from ..configs import ConfigError, add_dataclass_arguments, build_config, load_yaml
from ..train.config import TrainConfig
from .config import ROUND_OWNED, IterateConfig

GOLD_FIELDS = ("gold_scorer", "gold_scorer_path", "stop_on_gold_drop")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "iterate", help="Align a model from its own samples in rounds: generate, label, train, evaluate.",
        description="On-policy DPO in rounds. Round r samples --per-prompt candidates per training prompt from the "
                    "current policy, labels them with --scorer (pairs as `ncppo data generate`), trains the same LoRA "
                    "on them (every `ncppo train` flag applies; --max-steps is per round) and scores the held-out "
                    "--eval-prompts: proxy (labelling scorers), --gold-scorer and win rate vs the base. "
                    "--stop-on-gold-drop D stops when gold falls D below its best and keeps the best in best/. "
                    "Rerunning the same command continues where it stopped. Flags override the YAML file given "
                    "with --config (its keys are the flag names of iterate and train).")
    parser.add_argument("--config", metavar="YAML", help="YAML file of flag values (CLI flags override it).")
    add_dataclass_arguments(parser, IterateConfig)
    add_dataclass_arguments(parser, TrainConfig, skip=ROUND_OWNED)
    parser.set_defaults(func=run)


def configs_from_args(args) -> tuple[IterateConfig, TrainConfig]:
    """The two configs from the YAML file and the flags (flags win); unknown YAML keys are refused."""
    own = {f.name for f in dataclasses.fields(IterateConfig)}
    train = {f.name for f in dataclasses.fields(TrainConfig)} - set(ROUND_OWNED)
    values = load_yaml(args.config) if args.config else {}
    unknown = sorted(set(values) - own - train)
    if unknown:
        raise ConfigError(f"--config {args.config}: unknown key(s) {unknown}; see ncppo iterate --help")
    values.update({k: v for k, v in vars(args).items() if k in own | train})
    source = f"--config {args.config}" if args.config else "flags"
    iterate = build_config(IterateConfig, {k: v for k, v in values.items() if k in own}, source=source)
    train_values = {k: v for k, v in values.items() if k in train}
    train_values.update(data="(set per round)", output_dir=str(iterate.out))
    # The gold scorer may be evaluated between rounds only (no --gold-every): checked by iterate itself.
    gold = {k: train_values.pop(k) for k in GOLD_FIELDS if k in train_values}
    train_config = build_config(TrainConfig, train_values, source=source)
    return iterate, dataclasses.replace(train_config, **{k: v for k, v in gold.items()})


def run(args) -> int:
    from .rounds import iterate

    config, train_config = configs_from_args(args)
    summary = iterate(config, train_config)
    from .summary import table

    print(table(summary))
    if summary.get("stopped"):
        print(f"stopped by the gold guard: {summary['stopped']}")
    if summary.get("best"):
        print(f"best gold: round {summary['best']['round']} -> {config.out}/best")
    return 0
