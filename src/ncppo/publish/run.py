"""A training run read back for publishing: its weights, resolved config and counts.

RUN is a training output folder (`pytorch_lora_weights.safetensors`, or `unet/` / `transformer/`, `manifest.json`)
or one of its `checkpoint-<step>/` folders (`lora_adapter.safetensors` in peft keys and
`trainer_state.json`; the config comes from the output folder's `manifest.json` when the run got
that far). The LoRA is held in peft keys (`<module>.lora_A.weight`, `<module>.lora_B.weight`),
the one form every exporter starts from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import InputError, MissingInputError
from ..train.checkpoint import LORA_FILE, STATE_FILE, read_state, verify_checkpoint

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # ModelAdapter.save_lora's default name
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key for the LoraConfig


@dataclass
class TrainedRun:
    """What the exporters and the model card need to know about one run."""

    path: Path  # RUN as given
    output_dir: Path  # the training output folder (RUN, or RUN's parent for a checkpoint)
    model: str  # the base pipeline: hub id or folder
    family: str  # a key of ncppo.models.FAMILIES
    step: int | None
    config: dict[str, Any] = field(default_factory=dict)  # the resolved TrainConfig ({} without a manifest)
    manifest: dict[str, Any] | None = None
    lora: dict[str, torch.Tensor] | None = None  # peft keys; None for a full fine-tune
    alpha: float | None = None
    full_unet: Path | None = None  # a full fine-tune's saved denoiser folder (unet/ or transformer/)
    checkpoint: bool = False

    @property
    def adapter_class(self):
        from ..models import FAMILIES

        return FAMILIES[self.family]

    @property
    def modules(self) -> list[str]:
        """The adapted modules, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q."""
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.lora or {}})

    @property
    def rank(self) -> int | None:
        return _rank(self.lora) if self.lora else None

    def lora_config(self) -> dict[str, Any]:
        """peft's LoraConfig of the adapter as a dict (what diffusers stores as lora_adapter_metadata)."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.modules).to_dict()

    @cached_property
    def denoiser_config(self) -> dict[str, Any]:
        """config.json of the base pipeline's U-Net (or transformer)."""
        from diffusers import UNet2DConditionModel

        sub = self.adapter_class.lora_component
        return dict(_base_file(self, lambda: UNet2DConditionModel.load_config(
            self.model, subfolder=sub, revision=self.config.get("revision")), f"{sub}/config.json"))

    @cached_property
    def prediction_type(self) -> str:
        from diffusers import DDPMScheduler

        sched = _base_file(self, lambda: DDPMScheduler.load_config(
            self.model, subfolder="scheduler", revision=self.config.get("revision")), "scheduler/scheduler_config.json")
        if "FlowMatch" in str(sched.get("_class_name", "")):
            return "flow"  # rectified flow (SD3, FLUX): the denoiser predicts the velocity
        return sched.get("prediction_type", "epsilon")

    @property
    def data(self) -> dict[str, Any]:
        return (self.manifest or {}).get("data") or {}

    def provenance(self) -> dict[str, str]:
        """ncppo's own safetensors metadata: how the weights were trained (all values strings)."""
        c = self.config
        facts = {"version": __version__, "base_model": self.model, "family": self.family, "steps": self.step,
                 "objective": c.get("objective"), "space": c.get("space"), "beta": c.get("beta"),
                 "beta_convention": "ncppo: logits = beta * ((ref_w - ref_l) - (policy_w - policy_l))",
                 "effective_beta": ((self.manifest or {}).get("beta_normalization") or {}).get("effective_beta"),
                 "timestep_mode": c.get("timestep_mode") if c.get("space") == "ncp" else None,
                 "ncp_layers": c.get("ncp_layers") if c.get("space") == "ncp" else None,
                 "lora_rank": self.rank, "lora_alpha": self.alpha,
                 "data_source": self.data.get("source"), "data_pairs": self.data.get("pairs"),
                 "data_fingerprint": self.data.get("fingerprint")}
        return {f"ncppo.{k}": str(v) for k, v in facts.items() if v is not None}


def load_run(path: str | Path, *, model: str | None = None, lora_alpha: float | None = None,
             family: str | None = None) -> TrainedRun:
    """Read RUN (an output or checkpoint folder). `model`, `lora_alpha` and `family` override the
    manifest's; a checkpoint of a run that never wrote its manifest needs `lora_alpha` (its trainer
    state names the base model and the data, not the alpha)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"RUN {path}: no such folder (give a training output or checkpoint-<step> folder)")
    checkpoint = (path / STATE_FILE).is_file()
    output_dir = path.parent if checkpoint else path
    manifest = _read_json(output_dir / "manifest.json")
    config = dict((manifest or {}).get("config") or {})

    lora, stored_alpha, full_unet = None, None, None
    if checkpoint:
        problem = verify_checkpoint(path)
        if problem:
            raise InputError(f"RUN {path}: {problem}")
        state = read_state(path)
        step = state["step"]
        if manifest is None:  # a run that has not finished: its trainer state knows part of the config
            identity = state.get("run") or {}
            config = {k: identity[k] for k in _IDENTITY_CONFIG if identity.get(k) is not None}
            manifest = {"data": {"fingerprint": identity.get("data_fingerprint"), "pairs": identity.get("pairs")},
                        "processes": identity.get("processes")}
        if not (path / LORA_FILE).is_file():
            raise MissingInputError(f"RUN {path}: a checkpoint without {LORA_FILE} (a full fine-tune's checkpoint); "
                                    "export the finished run's output folder instead")
        lora = _load_tensors(path / LORA_FILE)
    else:
        step = (manifest or {}).get("steps")
        if (path / WEIGHTS_FILE).is_file():
            lora = path / WEIGHTS_FILE  # read below, once the family names the component prefix
        else:  # a full fine-tune: the U-Net's or the DiT's folder
            full_unet = next((path / d for d in ("unet", "transformer") if (path / d / "config.json").is_file()), None)
            if full_unet is None:
                raise MissingInputError(f"RUN {path}: neither a training output ({WEIGHTS_FILE}, unet/ or "
                                        f"transformer/) nor a checkpoint folder ({STATE_FILE})")

    model = model or config.get("model")
    if not model:
        also = " and --lora-alpha" if checkpoint and not (lora_alpha or config.get("lora_alpha")) else ""
        raise InputError(f"RUN {path}: no manifest.json in {output_dir} names the base model; pass --model{also}")
    family = family or config.get("family") or "auto"
    if family == "auto":
        family = _detect_family(model, config.get("revision"))
    if isinstance(lora, Path):
        from ..models import FAMILIES

        lora, stored_alpha = read_diffusers_lora(lora, FAMILIES[family].lora_component)

    alpha = None
    if lora is not None:
        rank = _rank(lora)
        alpha = lora_alpha or stored_alpha or config.get("lora_alpha")
        if not alpha and "objective" in config:  # a full training config without --lora-alpha: alpha = rank
            alpha = rank
        if not alpha:
            raise InputError(f"RUN {path}: no manifest.json in {output_dir} says the LoRA alpha; pass "
                             f"--lora-alpha (the run's --lora-alpha, or its rank {rank} if it had none)")
    return TrainedRun(path=path, output_dir=output_dir, model=model, family=family, step=step, config=config,
                      manifest=manifest, lora=lora, alpha=float(alpha) if alpha else None, full_unet=full_unet,
                      checkpoint=checkpoint)


# The config keys a checkpoint's run identity (checkpoint.run_identity) holds.
_IDENTITY_CONFIG = ("model", "vae", "revision", "variant", "finetune", "lora_rank", "lora_alpha", "lora_targets",
                    "batch_size", "gradient_accumulation_steps")


def read_diffusers_lora(file: str | Path, component: str = "unet") -> tuple[dict[str, torch.Tensor], float | None]:
    """A diffusers-format LoRA file of one pipeline component -> (peft-keyed state dict, alpha from
    its lora_adapter_metadata or None)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        metadata = fh.metadata() or {}
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    prefix = component + "."
    others = [k for k in state if not k.startswith(prefix)]
    if others:
        raise InputError(f"{file}: only {component} LoRA keys ({prefix}*) can be exported; found {others[0]!r}")
    state = convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in state.items()})
    alpha = None
    if METADATA_KEY in metadata:
        alpha = json.loads(metadata[METADATA_KEY]).get(prefix + "lora_alpha")
    return state, alpha


def _rank(lora: dict[str, torch.Tensor]) -> int:
    return next(v.shape[0] for k, v in lora.items() if k.endswith("lora_A.weight"))


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file))


def _read_json(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{file}: not valid JSON ({err})") from None


def _detect_family(model: str, revision: str | None) -> str:
    from ..models import detect_family

    try:
        return detect_family(model, revision)
    except (OSError, ValueError) as err:
        raise InputError(f"base model {model}: cannot read its model_index.json ({type(err).__name__}); "
                          "pass --model with a local copy of the base pipeline") from None


def _base_file(run: TrainedRun, read, name: str) -> dict[str, Any]:
    try:
        return read()
    except (OSError, ValueError) as err:
        raise InputError(f"base model {run.model}: cannot read {name} ({type(err).__name__}); "
                          "pass --model with a local copy of the base pipeline") from None
