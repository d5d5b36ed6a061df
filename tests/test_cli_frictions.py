"""Frictions users hit through the CLI (issue 19): noise on stderr, help text, flag errors,
hub ids that are really mistyped files, file modes, the `--model toy` alias."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from ncppo.cli import main
from ncppo.toy.base import SHIPPED_BASE


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_loading_a_pipeline_prints_no_torchvision_notice():
    """Loading as train does (the adapter, then the pipeline class for sampling and the LoRA save)
    used to print transformers' two "requires torchvision" notices."""
    done = run_python(f"""
        from ncppo.models import load_model
        adapter = load_model({str(SHIPPED_BASE)!r})
        adapter.build_pipeline()
        from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
        print("loaded")
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded" in done.stdout
    assert "torchvision" not in done.stderr, done.stderr[-2000:]


def subcommand_helps(parser, prefix="ncppo"):
    """(command path, help line) of every subcommand, nested ones (`ncppo data check`) included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{prefix} {choice.dest}", choice.help
            for name, sub in action.choices.items():
                yield from subcommand_helps(sub, f"{prefix} {name}")


def test_help_names_every_family_and_subcommand_help_lines_share_one_style(capsys):
    from ncppo.cli import build_parser

    helps = dict(subcommand_helps(build_parser()))
    assert len(helps) >= 15, helps  # train sample score compare data(3) demo toy(3) sbs(3) export
    for command, text in helps.items():
        assert text[0].isupper() and text.endswith("."), (command, text)
    for family in ("SD1.x/2.x", "SDXL", "SD3/SD3.5", "FLUX.1"):
        assert family in helps["ncppo train"]
    capsys.readouterr()
    try:
        main(["train", "--help"])
    except SystemExit:
        pass
    description = " ".join(capsys.readouterr().out.split())
    assert "SDXL, SD3/SD3.5 or FLUX.1 pipeline" in description
