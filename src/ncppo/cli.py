"""The `ncppo` command. Thin: each feature package registers its own subcommands in a
`commands.py` module (`register(subparsers)`), which parses, validates and calls the library.

Expected failures (`ncppo.errors.NcppoError`, `ConfigError`: a bad flag, file, row or column, a
full disk, a checkpoint of another run; and any `OSError` the commands did not name more precisely:
a file where a folder must go, no permission, a missing file) print one line, `ncppo <command>: error: <message>`, and
exit with code 2; `--debug` (anywhere on the command line) shows the traceback instead.
Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from . import __version__
from .configs import ConfigError
from .errors import NcppoError

EXPECTED = (ConfigError, NcppoError, OSError)

# Feature packages that contribute subcommands, in --help order.
COMMAND_MODULES = (
    "ncppo.train.commands",  # train
    "ncppo.evaluate.commands",  # sample, score, compare
    "ncppo.data.commands",  # data check | curate | cache | generate
    "ncppo.online.commands",  # iterate
    "ncppo.toy.commands",  # demo, toy build | data | study
    "ncppo.sbs.commands",  # sbs serve | results | export
    "ncppo.publish.commands",  # export (kohya, diffusers, merged; model card)
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors (a bad flag value, an unknown flag) are one line,
    `ncppo <command>: error: <message>; see ncppo <command> --help`, exit code 2, without the usage
    block. Subcommand parsers inherit the class (argparse makes them of the parent's type); an
    unknown flag is reported by the (sub)command it was given to, not by `ncppo`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not hasattr(namespace, "_extras_parser"):  # the innermost parser returns first
            namespace._extras_parser = self
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        owner = vars(namespace).pop("_extras_parser", self)
        if extras:
            owner.error("unrecognized arguments: " + " ".join(extras))
        return namespace


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ncppo",
        description="Preference alignment of text-to-image diffusion models in latent and "
        "noise-conditioned perceptual (NCP) space.",
    )
    parser.add_argument("--version", action="version", version=f"ncppo {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="Show the full traceback of an error instead of one line (may go anywhere on the line).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut]
    argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EXPECTED as err:
        if debug:
            raise
        _close_progress_bars()
        sys.stderr.write(f"ncppo {_command_name(args)}: error: {_one_line(err)}\n")  # one write: no interleaving
        sys.stderr.flush()
        return 2


def _close_progress_bars() -> None:
    """End a tqdm bar the error interrupted, so the error starts on its own line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _command_name(args) -> str:
    """`train`, or `data check` for a nested tool (its parser stores the tool in `<group>_command`)."""
    nested = [v for k, v in vars(args).items() if k.endswith("_command") and k != "command" and isinstance(v, str)]
    return " ".join([args.command, *nested])


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
