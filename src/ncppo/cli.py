"""The `ncppo` command. Thin: each feature package registers its own subcommands in a
`commands.py` module (`register(subparsers)`), which parses, validates and calls the library."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from . import __version__
from .configs import ConfigError

# Feature packages that contribute subcommands, in --help order.
COMMAND_MODULES = (
    "ncppo.train.commands",  # train
    "ncppo.evaluate.commands",  # sample, score, compare
    "ncppo.data.commands",  # data check | curate | cache
    "ncppo.toy.commands",  # demo, toy build | data | tune
    "ncppo.sbs.commands",  # sbs serve | results | export
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncppo",
        description="Preference alignment of text-to-image diffusion models in latent and "
        "noise-conditioned perceptual (NCP) space.",
    )
    parser.add_argument("--version", action="version", version=f"ncppo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"ncppo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
