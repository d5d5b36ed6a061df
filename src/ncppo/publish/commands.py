"""CLI: `ncppo export` (thin: parse, validate, call ncppo.publish.export)."""

from __future__ import annotations

import argparse

from ..configs import add_dataclass_arguments, config_from_args
from .export import ExportConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="Publish a run: kohya LoRA file, diffusers LoRA file, merged pipeline, model card.",
        description="Write a training run's weights in another format and/or its Hub model card. Examples: "
                    "`ncppo export runs/x --format kohya --out x.safetensors` (A1111, ComfyUI, Forge); "
                    "`ncppo export runs/x --format merged --out x-pipeline --dtype fp16 --card`; "
                    "`ncppo export runs/x --card --eval eval/ncp-vs-base` (refresh README.md with an eval table).")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML file of option values (keys = flag names); flags override it (default: none)")
    p.add_argument("run", nargs="?", default=argparse.SUPPRESS, help=ExportConfig.__dataclass_fields__["run"].metadata["help"])
    add_dataclass_arguments(p, ExportConfig)
    p.set_defaults(func=_export)


def _export(args) -> int:
    from .export import run_export

    for path in run_export(config_from_args(ExportConfig, args, args.config)):
        print(f"wrote {path}")
    return 0
