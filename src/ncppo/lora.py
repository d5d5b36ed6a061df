"""LoRA helpers: run the base network of a peft-LoRA model (the reference and the NCP encoder)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

REFERENCE_ADAPTER = "ncppo_reference"  # a frozen LoRA beside the trained "default" one (--reference-lora)


def _tuner_layers(model: torch.nn.Module) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: no model can carry adapters
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, ``model`` runs without its LoRA adapters (the frozen base network).

    Works for diffusers ``PeftAdapterMixin`` models (``unet.add_adapter``) and peft ``PeftModel``s:
    it toggles every peft tuner layer, which is what ``unet.disable_adapters()`` /
    ``enable_adapters()`` do. On exit each layer gets back its previous enabled state and every
    adapter parameter its previous ``requires_grad`` (peft's toggles set requires_grad as a side
    effect). A no-op for a model without adapters; safe to nest.
    """
    layers = _tuner_layers(model)
    was_disabled = [layer.disable_adapters for layer in layers]
    requires_grad = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for p, flag in requires_grad:
            p.requires_grad_(flag)


@contextmanager
def only_adapter(model: torch.nn.Module, name: str) -> Iterator[torch.nn.Module]:
    """Inside, ``model`` runs with its LoRA adapter ``name`` alone (e.g. a frozen reference adapter
    beside the trained one). On exit every layer gets back its active adapters and every adapter
    parameter its ``requires_grad`` (peft's ``set_adapter`` makes the active adapter trainable)."""
    layers = _tuner_layers(model)
    active = [list(layer.active_adapters) for layer in layers]
    requires_grad = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.set_adapter(name)
        yield model
    finally:
        for layer, names in zip(layers, active):
            layer.set_adapter(names)
        for p, flag in requires_grad:
            p.requires_grad_(flag)


def fit_report(expected: dict[str, tuple], saved: dict[str, torch.Tensor]) -> str | None:
    """None when `saved` holds exactly the keys of `expected` ({key: shape}) with those shapes, else
    what differs, in one line (a partial LoRA must never load silently)."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = sorted(k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return None
    parts = [f"{len(missing)} LoRA keys missing (e.g. {missing[0]})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
             f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(saved[wrong[0]].shape)} there, "
             f"{tuple(expected[wrong[0]])} now; another --lora-rank?)" if wrong else ""]
    return "; ".join(p for p in parts if p)


def read_lora_file(path: str, pipeline_class, component: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The denoiser part of a LoRA file or folder in any format ``load_lora_weights`` reads, as peft
    keys without the adapter name (``down_blocks.0...to_q.lora_A.weight``), and the file's
    ``lora_adapter_metadata`` (rank, alpha, targets) when it carries it."""
    import json
    from pathlib import Path

    from diffusers.utils import convert_unet_state_dict_to_peft

    from .errors import InputError, MissingInputError, first_line

    p = Path(path)
    if not p.exists():
        raise MissingInputError(f"{path}: no such LoRA file or folder")
    folder, weight_name = (p.parent, p.name) if p.is_file() else (p, None)
    try:
        loaded = pipeline_class.lora_state_dict(str(folder), weight_name=weight_name)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{path}: cannot read as a LoRA ({first_line(err)})") from err
    state = loaded[0] if isinstance(loaded, tuple) else loaded
    prefix = f"{component}."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        raise InputError(f"{path}: no {component} LoRA keys (a LoRA of another model family?)")
    state = convert_unet_state_dict_to_peft(state)
    metadata = None
    weight_file = p if p.is_file() else folder / "pytorch_lora_weights.safetensors"
    if weight_file.suffix == ".safetensors" and weight_file.is_file():
        from safetensors import safe_open

        with safe_open(str(weight_file), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("lora_adapter_metadata")
        if raw:
            meta = json.loads(raw)
            metadata = meta.get(component, meta) if isinstance(meta, dict) else None
    return state, metadata


def load_lora_into(model: torch.nn.Module, path: str, *, pipeline_class, component: str,
                   adapter_name: str = "default") -> None:
    """Load the LoRA file at ``path`` into ``model``'s existing adapter ``adapter_name``: every tensor
    of the adapter must be in the file with its shape, the file must hold nothing else for this
    denoiser, and a recorded rank/alpha must equal the adapter's (else an InputError naming it)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from .errors import InputError

    state, metadata = read_lora_file(path, pipeline_class, component)
    config = model.peft_config[adapter_name]
    if metadata:
        for key in ("r", "lora_alpha"):
            if key in metadata and float(metadata[key]) != float(getattr(config, key)):
                raise InputError(f"{path}: LoRA {key} {metadata[key]} there, {getattr(config, key)} in this run "
                                 "(set --lora-rank/--lora-alpha to the file's)")
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    problem = fit_report(expected, state)
    if problem:
        raise InputError(f"{path}: does not fit this run's LoRA: {problem}")
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise InputError(f"{path}: {len(unexpected)} keys did not load (e.g. {unexpected[0]})")
