"""`ncppo data check | curate | cache | generate`: parse flags/YAML into each tool's config and run it."""

from __future__ import annotations

import importlib
import importlib.util

from ..configs import add_dataclass_arguments, config_from_args

# subcommand -> (module, config class, runner, help)
TOOLS = {
    "check": ("ncppo.data.check", "CheckConfig", "run_check",
              "Scan a pair source and report bad rows, ties, modes, sizes, captions and duplicates."),
    "curate": ("ncppo.data.curate", "CurateConfig", "run_curate",
               "Filter pairs (absolute winners, drop ties, dedupe) into a new parquet dataset."),
    "cache": ("ncppo.data.cache", "CacheConfig", "run_cache",
              "Precompute VAE latents (and optionally text embeddings) of every pair for training."),
    "generate": ("ncppo.data.generate", "GenerateConfig", "run_command",
                 "Make pairs from a model's own samples: K candidates per prompt, labelled by reward models."),
}


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="Pair data tools: check, curate, cache, generate.",
                                 description="Pair data tools. check, curate and cache read any source `ncppo train "
                                             "--data` accepts; generate writes one from a model's own samples.")
    tools = data.add_subparsers(dest="data_command", metavar="TOOL")
    for name, (module, cls_name, _, help_text) in TOOLS.items():
        if importlib.util.find_spec(module) is None:
            continue
        cls = getattr(importlib.import_module(module), cls_name)
        parser = tools.add_parser(name, help=help_text, description=help_text + " Flags override the YAML file "
                                  "given with --config (its keys are the flag names).")
        if "data" in cls.__dataclass_fields__:  # the tools that read a pair source take it first
            parser.add_argument("data", metavar="DATA", help=cls.__dataclass_fields__["data"].metadata["help"])
        parser.add_argument("--config", metavar="YAML", help="YAML file of flag values (CLI flags override it).")
        add_dataclass_arguments(parser, cls)
        parser.set_defaults(func=_runner(name))
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])


def _runner(name: str):
    def run(args) -> int:
        module, cls_name, runner, _ = TOOLS[name]
        mod = importlib.import_module(module)
        config = config_from_args(getattr(mod, cls_name), args, args.config)
        return int(getattr(mod, runner)(config)[1])

    return run
