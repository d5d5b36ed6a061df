"""Reward-model scorers behind one interface: `get_scorer(name, path=None, device="cpu",
dtype=torch.float32, **options) -> Scorer` with `.name` and
`.score(images: list[PIL.Image], prompts: list[str]) -> Tensor (N,)`.

Scorers are imported lazily (by "module:Class" path) so a missing optional package only matters
for the scorer that needs it.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch

from .base import Scorer, score_in_batches

# name -> ("module:Class", fixed keyword arguments)
SCORERS: dict[str, tuple[str, dict]] = {
    "pickscore": ("ncppo.evaluate.scorers.pickscore:PickScore", {}),
    "hpsv2": ("ncppo.evaluate.scorers.hpsv2:HPSv2", {"name": "hpsv2"}),
    "hpsv2.1": ("ncppo.evaluate.scorers.hpsv2:HPSv2", {"name": "hpsv2.1"}),
    "imagereward": ("ncppo.evaluate.scorers.imagereward:ImageRewardScorer", {}),
    "clip": ("ncppo.evaluate.scorers.clip_score:CLIPScore", {}),
    "aesthetic": ("ncppo.evaluate.scorers.aesthetic:LaionAesthetic", {}),
    "toy-judge": ("ncppo.toy.judge:ToyJudge", {}),
}


def _import(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_scorer(name: str, path: str | None = None, device="cpu", dtype: torch.dtype = torch.float32,
               **options) -> Scorer:
    """Load the scorer `name` (see SCORERS) once; `path` is its weights (file, folder or hub id) and
    `options` are scorer-specific keywords (e.g. `clip_model`, `processor`, `tokenizer`).

    Missing or unloadable weights, and a missing optional package, raise `InputError` naming the
    scorer and the path."""
    from ...errors import InputError, MissingInputError, MissingPackageError, first_line
    from ...models import looks_like_path

    if name not in SCORERS:
        raise InputError(f"unknown scorer {name!r}; choose from {sorted(SCORERS)}")
    if path is not None and looks_like_path(str(path)) and not Path(path).expanduser().exists():
        raise MissingInputError(f"{name} scorer weights {path}: no such file or folder")
    target, fixed = SCORERS[name]
    cls = _import(target)
    kwargs = {"path": path, "device": device, "dtype": dtype, **fixed, **options}
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in options if k not in params]
        if unknown:
            raise InputError(f"scorer {name!r} takes no option(s) {unknown}; it takes {sorted(set(params) - {'self'})}")
        if path is not None and "path" not in params:
            raise InputError(f"scorer {name!r} takes no --scorer-path")
        # optional interface arguments a scorer (e.g. the toy judge) may not declare
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    try:
        scorer = cls(**kwargs)
    except InputError:
        raise
    except ImportError as err:
        raise MissingPackageError(f"{name} scorer: {err}") from err
    except (OSError, ValueError, KeyError) as err:  # missing or unreadable weights
        where = f" from {path}" if path is not None else " (default weights; pass --scorer-path for local ones)"
        raise InputError(f"{name} scorer: cannot load{where}: {first_line(err)}") from err
    if getattr(scorer, "name", "scorer") in (None, "", "scorer"):
        scorer.name = name
    return scorer


__all__ = ["SCORERS", "Scorer", "get_scorer", "score_in_batches"]
