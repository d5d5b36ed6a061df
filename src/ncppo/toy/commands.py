"""`ncppo demo` and `ncppo toy build | data | study | online`: thin wrappers over the toy modules."""

from __future__ import annotations

from ..configs import add_dataclass_arguments, config_from_args


def _add(subparsers, name, cls, func, help, description):
    parser = subparsers.add_parser(name, help=help, description=description + " Flags override the YAML "
                                   "file given with --config (its keys are the flag names).")
    parser.add_argument("--config", metavar="YAML", help="YAML file of flag values (CLI flags override it).")
    add_dataclass_arguments(parser, cls)
    parser.set_defaults(func=lambda args: func(config_from_args(cls, args, args.config)))
    return parser


def register(subparsers) -> None:
    from .base import BuildConfig
    from .data import DataConfig
    from .demo import DemoConfig
    from .online import OnlineConfig
    from .study import StudyConfig

    _add(subparsers, "demo", DemoConfig, _demo, help="Toy-world demo: latent-DPO vs NCP-DPO on CPU, no downloads.",
         description="Load the shipped tiny base, make judge-labelled pairs, train latent-DPO and NCP-DPO LoRAs "
                     "with the same budget, score held-out prompts with the toy judge, write report.md, "
                     "results.json and figures.")
    toy = subparsers.add_parser("toy", help="The toy world: build the base, make pairs, run the NCP vs latent study.",
                                description="The toy image world (see docs/toy.md).")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    toy.set_defaults(func=lambda args: toy.print_help() or 2)
    _add(toy_sub, "build", BuildConfig, _build, help="Pretrain the tiny base pipeline from scratch.",
         description="Reproduce the shipped toy base: VAE, cached latents, U-Net + text encoder.")
    _add(toy_sub, "data", DataConfig, _data, help="Make Pick-a-Pic-schema pairs labelled by the toy judge.",
         description="Write a parquet shard of toy-world pairs (caption, jpg_0, jpg_1, label_0, ...).")
    _add(toy_sub, "online", OnlineConfig, _online, help="Offline pairs vs on-policy rounds, and the gold guard "
         "against a hackable proxy.",
         description="Offline (fixed toy pairs) against on-policy `ncppo iterate` at equal steps and images, in latent "
                     "and NCP space, over several training seeds; then iterate labelled by the hackable toy-proxy with the "
                     "judge as gold, without and with --stop-on-gold-drop. Resumable (skips runs already in results.json); "
                     "writes report.md, summary.json and figures. See docs/online.md.")
    _add(toy_sub, "study", StudyConfig, _study, help="NCP-DPO vs latent-DPO with statistical power; beta transfer.",
         description="Normalised-beta grids per space (widened until the best is interior), each space at its best "
                     "over several training seeds with held-out images, score curves with bands, a pooled head-to-head "
                     "win rate, NCP variants and other objectives; resumable (skips runs already in results.json); "
                     "writes report.md, results.json and figures. See docs/study.md.")


def _build(cfg) -> int:
    from .base import build_base

    out = build_base(cfg)
    print(f"toy base saved to {out}")
    return 0


def _data(cfg) -> int:
    from .data import build_pairs

    out = build_pairs(cfg)
    print(f"{cfg.pairs} pairs written to {out}")
    return 0


def _demo(cfg) -> int:
    from .demo import run_demo

    run_demo(cfg)
    return 0


def _online(cfg) -> int:
    from .online import run_online

    run_online(cfg)
    return 0


def _study(cfg) -> int:
    from .study import run_study

    run_study(cfg)
    return 0
