"""`ncppo train`: parse flags/YAML into a TrainConfig and run the recipe."""

from __future__ import annotations

from ..configs import add_dataclass_arguments, config_from_args
from .config import TrainConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="Preference fine-tuning (LoRA or full) of an SD1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 pipeline.",
        description="Preference fine-tuning of a diffusers SD1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 pipeline with "
                    "DPO/CPO/SFT/IPO/hinge/ORPO in latent or NCP space. Several processes: "
                    "`accelerate launch -m ncppo train ...`. Flags override the YAML file given with --config (its keys "
                    "are the flag names).")
    parser.add_argument("--config", metavar="YAML", help="YAML file of flag values (CLI flags override it).")
    add_dataclass_arguments(parser, TrainConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    config = config_from_args(TrainConfig, args, args.config)
    from .loop import train

    result = train(config)
    print(f"saved {result.weights_path} after {result.steps} steps")
    return 1 if result.stopped_early and not result.gold_stopped else 0
