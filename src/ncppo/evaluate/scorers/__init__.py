"""Reward-model scorers behind one interface: `get_scorer(name, path=None, device="cpu",
dtype=torch.float32, **options) -> Scorer` with `.name` and
`.score(images: list[PIL.Image], prompts: list[str]) -> Tensor (N,)`.

Scorers are imported lazily (by "module:Class" path) so a missing optional package only matters
for the scorer that needs it.

A user's own reward is a scorer too: `name` = ``module:callable`` (a dotted module on the Python
path, or a ``.py`` file) names a function (or a class to instantiate without arguments, then its
`score` or `__call__`) called as ``(images: list[PIL.Image], prompts: list[str]) -> sequence of
floats``, one per image; see `CallableScorer`.
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
    "toy-proxy": ("ncppo.toy.judge:ToyProxyJudge", {}),  # the judge plus a blind spot: reward hacking on a CPU
}


# How to get each scorer's default weights onto an offline machine (named in the load error).
GET_WEIGHTS = {
    "pickscore": "huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir W/pickscore and "
                 "laion/CLIP-ViT-H-14-laion2B-s32B-b79K --local-dir W/clip-h, then --scorer-path W/pickscore "
                 "--scorer-option processor=W/clip-h",
    "hpsv2": "huggingface-cli download xswu/HPSv2 HPS_v2_compressed.pt --local-dir W, then --scorer-path "
             "W/HPS_v2_compressed.pt (tokenizer: --scorer-option tokenizer=DIR of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    "hpsv2.1": "huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir W, then --scorer-path "
               "W/HPS_v2.1_compressed.pt (tokenizer: --scorer-option tokenizer=DIR of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    "clip": "huggingface-cli download openai/clip-vit-large-patch14 --local-dir W/clip-l, then --scorer-path W/clip-l",
    "aesthetic": "get sac+logos+ava1-l14-linearMSE.pth from LAION's aesthetic predictor and "
                 "openai/clip-vit-large-patch14, then --scorer-path FILE --scorer-option clip_model=DIR",
    "imagereward": "pip install 'ncppo[imagereward]' and download ImageReward-v1.0, then --scorer-path FILE",
}


def _import(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def is_callable_spec(name: str) -> bool:
    """True for a user's ``module:callable`` (or ``file.py:callable``) scorer, not a built-in name."""
    return name not in SCORERS and ":" in name and all(name.partition(":")[::2])


def parse_weighted(spec: str) -> tuple[str, float]:
    """``NAME[:WEIGHT]`` -> (NAME, WEIGHT); the weight is what follows the last colon when it is a
    number, so ``pkg.rewards:fn`` keeps weight 1 and ``pkg.rewards:fn:0.5`` has 0.5."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


class CallableScorer(Scorer):
    """A user's reward function as a scorer: ``fn(images, prompts) -> sequence of floats`` (or a
    tensor/array), one per image; NaN is allowed (callers skip those images)."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def score(self, images: list, prompts: list[str]) -> torch.Tensor:
        import numpy as np

        from ...errors import InputError

        out = self.fn(list(images), list(prompts))
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
        try:
            values = np.asarray(list(out) if not isinstance(out, np.ndarray) else out, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise InputError(f"scorer {self.name}: returned {type(out).__name__}, not a sequence of numbers ({err})") from None
        if values.shape[0] != len(images):
            raise InputError(f"scorer {self.name}: returned {values.shape[0]} scores for {len(images)} images")
        return torch.from_numpy(values).float()


def load_callable(spec: str):
    """The object ``module:attr`` names (``attr`` may be dotted); ``module`` may be a ``.py`` file.
    A module of the current folder is found too (as ``python -m`` would)."""
    import importlib.util
    import sys

    from ...errors import InputError

    module_name, _, attr = spec.partition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise InputError(f"scorer {spec}: no such file {module_name}")
            if str(path.resolve().parent) not in sys.path:  # its own imports of files beside it, as `python file.py`
                sys.path.append(str(path.resolve().parent))
            module_spec = importlib.util.spec_from_file_location(f"ncppo_user_scorer_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.append(str(Path.cwd()))
            module = importlib.import_module(module_name)
    except InputError:
        raise
    except ImportError as err:
        raise InputError(f"scorer {spec}: cannot import {module_name} ({err}); put it on PYTHONPATH, run from its "
                         "folder, or give the .py file's path") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"scorer {spec}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        obj = obj()
        obj = getattr(obj, "score", obj)
    if not callable(obj):
        raise InputError(f"scorer {spec}: {attr} is not callable")
    return obj


def get_scorer(name: str, path: str | None = None, device="cpu", dtype: torch.dtype = torch.float32,
               **options) -> Scorer:
    """Load the scorer `name` (see SCORERS) once; `path` is its weights (file, folder or hub id) and
    `options` are scorer-specific keywords (e.g. `clip_model`, `processor`, `tokenizer`).

    Missing or unloadable weights, and a missing optional package, raise `InputError` naming the
    scorer and the path."""
    from ...errors import InputError, MissingInputError, MissingPackageError, first_line
    from ...hub import unreachable
    from ...models import looks_like_path

    if is_callable_spec(name):
        if path is not None or options:
            raise InputError(f"scorer {name}: a module:callable scorer takes no --scorer-path or options")
        return CallableScorer(name, load_callable(name))
    if name not in SCORERS:
        raise InputError(f"unknown scorer {name!r}; choose from {sorted(SCORERS)} or name your own as module:callable")
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
    hub_weights = name in GET_WEIGHTS and (path is None or not Path(path).expanduser().exists())
    if hub_weights:
        unreachable()  # offline: fail at once below, not after a minute of retries per file
    try:
        scorer = cls(**kwargs)
    except InputError:
        raise
    except ImportError as err:
        raise MissingPackageError(f"{name} scorer: {err}") from err
    except (OSError, ValueError, KeyError) as err:  # missing or unreadable weights
        where = f" from {path}" if path is not None else " (default weights; pass --scorer-path for local ones)"
        how = f"; to get them where the Hub is reachable: {GET_WEIGHTS[name]} (docs/evaluation.md)" if (
            path is None and name in GET_WEIGHTS) else ""
        reason = unreachable() if hub_weights else None
        cause = (f"the Hugging Face Hub cannot be reached ({reason}) and they are not in the local cache"
                 if reason else first_line(err))
        raise InputError(f"{name} scorer: cannot load{where}: {cause}{how}") from err
    if getattr(scorer, "name", "scorer") in (None, "", "scorer"):
        scorer.name = name
    return scorer


__all__ = ["SCORERS", "CallableScorer", "Scorer", "get_scorer", "is_callable_spec", "parse_weighted", "score_in_batches"]
