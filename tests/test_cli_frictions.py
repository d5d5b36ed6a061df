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


BAD_FLAGS = [
    (["train", "--space", "foo"], "ncppo train", "argument --space: invalid choice: 'foo'"),
    (["train", "--learning-rate", "abc"], "ncppo train", "argument --learning-rate: invalid float value: 'abc'"),
    (["train", "--gradient-checkpointing", "maybe"], "ncppo train", "expected true/false, got 'maybe'"),
    (["train", "--bogus", "1"], "ncppo train", "unrecognized arguments: --bogus 1"),
    (["sample", "--steps", "x"], "ncppo sample", "argument --steps: invalid int value: 'x'"),
    (["score", "--dtype", "int8"], "ncppo score", "argument --dtype: invalid choice: 'int8'"),
    (["data", "check", "pairs", "--nope"], "ncppo data check", "unrecognized arguments: --nope"),
    (["data", "check"], "ncppo data check", "the following arguments are required: DATA"),
    (["toy", "data", "--pairs", "many"], "ncppo toy data", "argument --pairs: invalid int value: 'many'"),
    (["sbs", "serve", "a", "b", "--port", "x"], "ncppo sbs serve", "argument --port: invalid int value: 'x'"),
    (["export", "--format", "ckpt"], "ncppo export", "argument --format: invalid choice: 'ckpt'"),
    (["trian"], "ncppo", "argument COMMAND: invalid choice: 'trian'"),
]


def test_a_bad_flag_is_one_error_line_naming_the_command_and_its_help(capsys):
    """No usage block: exactly `ncppo <command>: error: <argparse's message>; see ncppo <command> --help`, exit 2."""
    for argv, prog, message in BAD_FLAGS:
        capsys.readouterr()
        try:
            main(argv)
            raise AssertionError(f"{argv} did not fail")
        except SystemExit as stop:
            assert stop.code == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert captured.out == "" and len(lines) == 1, (argv, captured.err)
        assert lines[0].startswith(f"{prog}: error: ") and message in lines[0], (argv, lines[0])
        assert lines[0].endswith(f"; see {prog} --help"), (argv, lines[0])
