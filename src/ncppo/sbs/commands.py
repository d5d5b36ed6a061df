"""CLI: `ncppo sbs serve | results | export` (thin: parse, validate, call the library)."""

from __future__ import annotations

import sys

from ..configs import add_dataclass_arguments, config_from_args
from .export import ExportConfig
from .results import ResultsConfig
from .server import ServeConfig


def _serve(config: ServeConfig) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("ncppo sbs serve: needs FastAPI and uvicorn: pip install 'ncppo[sbs]'", file=sys.stderr)
        return 2
    from .server import run_serve

    run_serve(config)
    return 0


def _results(config: ResultsConfig) -> int:
    from .results import run_results

    run_results(config)
    return 0


def _export(config: ExportConfig) -> int:
    from .export import run_export

    run_export(config)
    return 0


TOOLS = {
    "serve": (ServeConfig, _serve, "Serve the blind A/B voting page over two sample folders.",
              "Serve a local page that shows the images of two `ncppo sample` folders side by side, blind and in "
              "random left/right order, for the same prompt and seed. Keys 1 / 2 / 3 (left better / right better / "
              "tie) answer each question; every vote is appended to --out at once and an annotator resumes where "
              "they stopped.", [("dir_a", None), ("dir_b", None)]),
    "results": (ResultsConfig, _results, "Win rates, intervals and agreement from vote files.",
                "Per question: win rate of A over B from the majority vote per item (ties half) with a two-stage "
                "bootstrap interval over prompts then items, Krippendorff's alpha and votes per annotator; "
                "writes sbs.json and sbs.md to --out.", [("votes", "+")]),
    "export": (ExportConfig, _export, "Votes as Pick-a-Pic-schema training pairs.",
               "Write the votes as preference pairs (caption, jpg_0/jpg_1 or image_0/image_1, label_0 with ties "
               "as 0.5) that `ncppo train --data` and `ncppo data check` read.", [("votes", "+")]),
}


def register(subparsers) -> None:
    sbs = subparsers.add_parser("sbs", help="Human side-by-side evaluation: serve, results, export.",
                                description="Human side-by-side evaluation of two sample folders in the browser.")
    tools = sbs.add_subparsers(dest="sbs_command", metavar="TOOL")
    for name, (cls, func, help_text, description, positionals) in TOOLS.items():
        parser = tools.add_parser(name, help=help_text, description=description + " Flags override the YAML "
                                  "file given with --config (its keys are the flag names).")
        for dest, nargs in positionals:
            parser.add_argument(dest, nargs=nargs, metavar=dest.upper(),
                                help=cls.__dataclass_fields__[dest].metadata["help"])
        parser.add_argument("--config", metavar="YAML", help="YAML file of flag values (CLI flags override it).")
        add_dataclass_arguments(parser, cls)
        parser.set_defaults(func=_runner(cls, func))
    sbs.set_defaults(func=lambda args: (sbs.print_help(), 2)[1])


def _runner(cls, func):
    def run(args) -> int:
        config = config_from_args(cls, args, args.config)
        try:
            return func(config)
        except (ValueError, FileNotFoundError) as err:  # bad folders or vote files: say which, no traceback
            print(f"ncppo sbs {args.sbs_command}: error: {err}", file=sys.stderr)
            return 2

    return run
