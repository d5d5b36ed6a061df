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
