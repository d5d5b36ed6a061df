"""Speed levers of `ncppo train` that change no result: regional torch.compile and channels_last.

Regional compilation compiles each repeated block (the U-Net's transformer blocks, the DiT's
joint / single-stream blocks) in place, not the whole model. The NCP pass calls the encoder's blocks
directly and the reference is the same module with its adapters off; both go through the compiled
blocks, and compiling a block compiles it once for all its copies' shapes (diffusers'
`compile_repeated_blocks` does the same for the models that declare `_repeated_blocks`). Module
names and state-dict keys are unchanged, so LoRA saving, checkpoints and resume are unaffected.
"""

from __future__ import annotations

import torch

from ..errors import InputError

# Models whose diffusers class does not declare `_repeated_blocks`.
REPEATED_BLOCKS = {"SD3Transformer2DModel": ("JointTransformerBlock",)}


def repeated_block_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Class names of the blocks to compile in `model` (empty if none are known)."""
    declared = tuple(getattr(model, "_repeated_blocks", None) or ())
    return declared or REPEATED_BLOCKS.get(type(model).__name__, ())


def compile_blocks(model: torch.nn.Module, *, backend: str = "inductor", mode: str | None = None) -> int:
    """torch.compile every repeated block of `model` in place; returns how many were compiled."""
    names = set(repeated_block_names(model))
    if not names:
        raise InputError(f"--compile: no repeated blocks known for {type(model).__name__}")
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile(backend=backend, mode=None if mode == "default" else mode)
    return len(blocks)


def to_channels_last(model: torch.nn.Module) -> None:
    """Store 4-D (convolution) weights channels-last; cuDNN's NHWC kernels then avoid layout
    transposes under bf16/fp16. Values are unchanged."""
    model.to(memory_format=torch.channels_last)
