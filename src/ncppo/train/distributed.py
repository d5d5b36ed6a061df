"""Which multi-process setups `ncppo train` supports; anything else is refused at start.

Supported and tested: one process, and DDP over several processes (`accelerate launch` or
torchrun; GPUs with NCCL, CPUs with gloo). Refused: FSDP and DeepSpeed. FSDP shards the U-Net's
weights, and the NCP pass calls the frozen encoder's blocks directly, the reference is the same
U-Net with its adapters off, and the LoRA save hook reads whole LoRA tensors: on sharded weights
these would fail or, worse, read shards. DeepSpeed (ZeRO-2 keeps weights whole) is untested here:
accelerate runs neither FSDP nor DeepSpeed on CPU processes, the only ones this project's CI has.
"""

from __future__ import annotations

from ..errors import InputError

SUPPORTED = "one process, or DDP over several (accelerate launch / torchrun; NCCL on GPUs, gloo on CPUs)"
REQUEST_ENV = (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
               ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM"))


def check_supported(accelerator=None) -> None:
    """Raise InputError naming what is supported when accelerate was asked for FSDP, DeepSpeed or
    Megatron-LM, including on CPUs, where accelerate silently falls back to DDP. Call it before
    creating the Accelerator (which fails with a traceback when DeepSpeed is not installed) and
    again with it."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    asked = [name for env, name in REQUEST_ENV if parse_flag_from_env(env)]
    running = None if accelerator is None else {
        DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
        DistributedType.MEGATRON_LM: "Megatron-LM"}.get(accelerator.distributed_type)
    names = list(dict.fromkeys([*asked, *([running] if running else [])]))
    if names:
        raise InputError(f"{' and '.join(names)} not supported: ncppo train runs as {SUPPORTED}; sharded weights "
                         "would break the NCP encoder pass, the adapters-off reference and the LoRA save "
                         "(pick multi-GPU without FSDP/DeepSpeed in `accelerate config`)")
