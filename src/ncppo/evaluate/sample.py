"""Seeded image generation for evaluation: `ncppo sample` and the in-process `sample_images`.

The image for (prompt i, seed s) depends only on the prompt, the seed and the settings: each
image gets its own CPU `torch.Generator` seeded with s, so the batch size, the number of
processes and the order of work do not change it (up to the float rounding of batched kernels).

Crash safety: the settings manifest (with the LoRA's content hash and a hash per prompt) is
written before the first image, so a rerun into the same --out after a crash continues only with
the same settings and prompts; each PNG appears under its final name only when complete; the
index is written atomically at the end, and a truncated last line of an index is ignored.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configs import ConfigError
from ..errors import InputError, MissingInputError, first_line

PROMPT_COLUMNS = ("prompt", "caption", "Prompt", "text")
INDEX_FILE = "index.jsonl"
MANIFEST_FILE = "sample_manifest.json"
IMAGE_DIR = "images"

# name -> (diffusers scheduler class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
LORA_ADAPTER = "ncppo_sample_lora"  # not "eval": adapter names become module attributes
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PromptSourceError(InputError):
    """A prompt file or dataset cannot be read; the message names the source and row."""


# ---------------------------------------------------------------- prompts
def _pick_column(columns, column: str | None, source) -> str:
    if column:
        if column not in columns:
            raise PromptSourceError(f"{source}: no column {column!r}; columns are {list(columns)}")
        return column
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise PromptSourceError(f"{source}: no prompt column among {list(columns)}; name one with --prompt-column")


def _check_prompt(value, source, row) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PromptSourceError(f"{source}, row {row}: empty or non-text prompt {value!r}")
    return value.strip()


def read_prompts(source: str | Path, *, column: str | None = None, split: str = "train",
                 unique: bool = False, limit: int | None = None) -> list[str]:
    """Prompts from a .txt (one a line, blank lines skipped), .csv / .tsv / .jsonl / .json / .parquet column,
    a `datasets` `save_to_disk` folder or a `datasets` hub id (`split`, `column`), or a toy-world split
    (`toy:train`, `toy:validation`, `toy:eval`, `toy:all`).

    A .json file may be a list of strings (the HPSv2 benchmark files) or of objects. The column
    defaults to the first of prompt, caption, Prompt, text. `unique` keeps the first occurrence of
    each prompt (e.g. the 500 unique Pick-a-Pic validation prompts); `limit` keeps the first N.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if str(source).startswith(TOY_PROMPTS) and not path.exists():
        prompts = _toy_prompts(str(source))
    elif path.is_file() and suffix == ".txt":
        prompts = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    elif path.is_file() and suffix in (".csv", ".tsv"):
        text = _read_text(path)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        col = _pick_column(reader.fieldnames or [], column, path)
        prompts = [_check_prompt(row.get(col), path, i + 2) for i, row in enumerate(reader)]  # +2: header, 1-based
    elif path.is_file() and suffix in (".jsonl", ".json"):
        prompts = _read_json_prompts(path, column)
    elif path.is_file() and suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        col = _pick_column(table.column_names, column, path)
        prompts = [_check_prompt(v, path, i) for i, v in enumerate(table.column(col).to_pylist())]
    elif path.is_file():
        raise PromptSourceError(f"{path}: unsupported prompt file type {suffix!r} (.txt, .csv, .tsv, .jsonl, .json, .parquet)")
    else:
        prompts = _read_dataset_prompts(str(source), column, split)
    if unique:
        prompts = list(dict.fromkeys(prompts))
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise PromptSourceError(f"{source}: no prompts")
    return prompts


TOY_PROMPTS = "toy:"  # toy:train, toy:validation, toy:eval, toy:all: the toy world's prompt splits


def _toy_prompts(source: str) -> list[str]:
    from ..toy import world

    split = source[len(TOY_PROMPTS):]
    try:
        return world.prompts(split)
    except ValueError as err:
        raise PromptSourceError(f"{source}: {err}") from None


def _read_text(path: Path) -> str:
    """A prompt file's text: UTF-8, a leading byte-order mark (Excel's "CSV UTF-8") dropped."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptSourceError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def _read_json_prompts(path: Path, column: str | None) -> list[str]:
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise PromptSourceError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise PromptSourceError(f"{path}: expected a JSON list of prompts or of objects")
    else:
        rows = []
        for i, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PromptSourceError(f"{path}, line {i}: not valid JSON ({err})") from None
    prompts = []
    for i, row in enumerate(rows, 1):
        if isinstance(row, str):
            prompts.append(_check_prompt(row, path, i))
        elif isinstance(row, dict):
            prompts.append(_check_prompt(row.get(_pick_column(row.keys(), column, f"{path}, row {i}")), path, i))
        else:
            raise PromptSourceError(f"{path}, row {i}: expected a string or an object, got {type(row).__name__}")
    return prompts


def _read_dataset_prompts(source: str, column: str | None, split: str) -> list[str]:
    import datasets

    if Path(source).is_dir():
        try:
            ds = datasets.load_from_disk(source)
        except FileNotFoundError as err:
            raise PromptSourceError(f"{source}: not a prompt file or a datasets save_to_disk folder ({err})") from None
    else:
        from ..hub import offline_message, unreachable
        from ..models import looks_like_path

        if looks_like_path(source):  # a file name (x.txt), a/b/c, ./x: a mistyped file, not a hub id
            raise MissingInputError(f"{source}: no such file or folder")
        unreachable()  # offline: fail at once below, not after a minute of retries
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as err:  # hub/network/format errors all mean "cannot read this source"
            offline = offline_message(source, "a local file or folder")
            raise PromptSourceError(offline or f"{source}: cannot load as a prompt file or datasets id ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PromptSourceError(f"{source}: no split {split!r}; splits are {list(ds)}")
        ds = ds[split]
    col = _pick_column(ds.column_names, column, source)
    return [_check_prompt(v, source, i) for i, v in enumerate(ds[col])]


# ---------------------------------------------------------------- pipeline
def set_scheduler(pipeline, name: str) -> None:
    """Replace the pipeline's scheduler by `name` (see SCHEDULERS), built from its scheduler config;
    "default" keeps the saved one."""
    if name == "default":
        return
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {['default', *SCHEDULERS]}")
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    pipeline.scheduler = getattr(diffusers, cls_name).from_config(pipeline.scheduler.config, **extra)


def load_pipeline(model: str, *, lora: str | None = None, lora_scale: float = 1.0, unet: str | None = None,
                  scheduler: str = "default", dtype: torch.dtype = torch.float32, device="cpu",
                  revision: str | None = None, variant: str | None = None, vae: str | None = None):
    """`DiffusionPipeline.from_pretrained(model)` (SD, SDXL, SD3, FLUX), with an optional full fine-tuned
    denoiser folder (`unet`: a U-Net or DiT folder, or its parent holding `unet/` or `transformer/`) and an
    optional LoRA file or folder loaded with `pipe.load_lora_weights` at `lora_scale`, and an optional
    separate `vae` (hub id or folder, as `train --vae`). A LoRA none of whose
    keys reaches the denoiser (U-Net or transformer) is an error, not a silent sample of the base model.
    Text encoders the pipeline was saved without (SD3's `text_encoder_3=None`) stay None."""
    import diffusers
    from diffusers import DiffusionPipeline

    from ..models import check_pipeline_folder, looks_like_path

    check_pipeline_folder(model, flag="--model", vae=vae)
    kwargs = _saved_without(model, revision)
    if vae:
        from ..models.base import load_vae

        try:
            kwargs["vae"] = load_vae(vae, dtype)
        except OSError as err:
            raise InputError(f"--vae {vae}: cannot load ({first_line(err)})") from err
    if unet:
        unet_dir = Path(unet)
        for sub in ("unet", "transformer"):
            if (unet_dir / sub / "config.json").is_file():
                unet_dir = unet_dir / sub
        if not (unet_dir / "config.json").is_file():
            raise MissingInputError(f"--unet {unet}: no U-Net/transformer config.json there or in its unet/ or "
                                    "transformer/ subfolder")
        cls_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "UNet2DConditionModel")
        component = "unet" if cls_name.startswith("UNet") else "transformer"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            kwargs[component] = getattr(diffusers, cls_name).from_pretrained(unet_dir, torch_dtype=dtype)
    with warnings.catch_warnings():  # diffusers >= 0.36 renamed torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, revision=revision, variant=variant,
                                                     **kwargs)
        except OSError as err:  # missing/unreadable weights, an unreachable hub id
            raise InputError(f"--model {model}: cannot load ({first_line(err)})") from err
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # evaluation scores the raw samples; a blacked-out image is not a sample
    if lora:
        _load_lora(pipe, lora, looks_like_path)
        if lora_scale != 1.0:
            pipe.set_adapters([LORA_ADAPTER], adapter_weights=[lora_scale])
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _saved_without(model: str, revision: str | None) -> dict:
    """{component: None} for the text encoders/tokenizers model_index.json lists as [null, null] (SD3 saved
    with text_encoder_3=None): from_pretrained must be told to leave them out."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(model, revision=revision)
    except (OSError, ValueError):
        return {}  # from_pretrained reports it
    return {k: None for k, v in index.items() if k.startswith(("text_encoder", "tokenizer"))
            and isinstance(v, (list, tuple)) and not any(v)}


class _NoTextEncoderLoraNotice:
    """Drops diffusers' "No LoRA keys associated to <text encoder> found" notice while a LoRA loads:
    ncppo's LoRAs adapt the denoiser only, and `_load_lora` checks that the denoiser got it."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not (message.startswith("No LoRA keys associated to") and "text_encoder" in message)


def _load_lora(pipe, lora: str, looks_like_path) -> None:
    import logging

    notice, logger = _NoTextEncoderLoraNotice(), logging.getLogger("diffusers.loaders.lora_base")
    logger.addFilter(notice)
    try:
        _load_lora_weights(pipe, lora, looks_like_path)
    finally:
        logger.removeFilter(notice)


def _load_lora_weights(pipe, lora: str, looks_like_path) -> None:
    lora_path = Path(lora)
    try:
        if lora_path.is_file():
            pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name=LORA_ADAPTER)
        elif lora_path.is_dir():
            pipe.load_lora_weights(str(lora_path), adapter_name=LORA_ADAPTER)
        elif looks_like_path(lora):
            raise MissingInputError(f"--lora {lora}: no such file or folder")
        else:
            pipe.load_lora_weights(lora, adapter_name=LORA_ADAPTER)  # a hub id
    except InputError:
        raise
    except (OSError, ValueError) as err:  # unreadable file, no LoRA keys, keys naming no module of this model
        raise InputError(f"--lora {lora}: cannot load as a LoRA of this model ({first_line(err)})") from err
    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    if LORA_ADAPTER not in (pipe.get_list_adapters().get(denoiser) or []):
        raise InputError(f"--lora {lora}: none of its keys matches the {denoiser} of --model (a LoRA of another "
                         "model family, or one that adapts only the text encoder?); sampling would run the base model")


def lora_sha256(lora: str | None) -> str | None:
    """Content hash of a LoRA file, or of a folder's weight files (names and contents); None without a
    LoRA; a hub id hashes to itself (its revision pins it). A .safetensors file counts by its tensors
    and its metadata, not by the order safetensors happened to write its header keys in (which
    changes from process to process), so the same weights saved twice hash alike."""
    if not lora:
        return None
    path = Path(lora)
    files = [path] if path.is_file() else sorted(
        f for f in path.glob("*") if f.is_file() and f.suffix in (".safetensors", ".bin")) if path.is_dir() else []
    digest = hashlib.sha256()
    if not files:
        digest.update(str(lora).encode())
    for f in files:
        digest.update(f.name.encode() if len(files) > 1 else b"")
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors":
                size = int.from_bytes(fh.read(8), "little")
                try:
                    header = json.loads(fh.read(size))
                    if isinstance(header.get("__metadata__"), dict):
                        header["__metadata__"] = {k: _canonical_json(v) for k, v in header["__metadata__"].items()}
                    digest.update(json.dumps(header, sort_keys=True).encode())
                except (ValueError, UnicodeDecodeError, AttributeError):  # not a safetensors header: bytes
                    fh.seek(0)
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _canonical_json(text: str) -> str:
    """A metadata value that is JSON (diffusers' lora_adapter_metadata) with its keys sorted."""
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except (TypeError, ValueError):
        return text


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def sample_images(pipeline, prompts: list[str], seeds, *, steps: int, guidance: float,
                  height: int | None = None, width: int | None = None, batch_size: int = 4,
                  negative_prompt: str | None = None, progress: bool = True, progress_desc: str = "sampling") -> list:
    """Generate one PIL image per (prompts[k], seeds[k]) with an already-loaded pipeline.

    `seeds` is a list as long as `prompts`, or one int used for every prompt. Every image has
    its own CPU generator, so the result does not depend on `batch_size`. `progress_desc`
    labels the progress bar.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    seeds = [int(seeds)] * len(prompts) if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=progress_desc, unit="batch", disable=not progress):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + batch_size]]
        out = pipeline(
            prompt=batch,
            negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=generators,
            output_type="pil",
        )
        images.extend(out.images)
    return images


# ---------------------------------------------------------------- the command
@dataclass
class SampleConfig:
    model: str = field(metadata={"help": "base model: a diffusers folder or hub id (SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1)"})
    prompts: str = field(metadata={"help": "prompt source: .txt (one a line), .csv/.tsv/.jsonl/.json/.parquet column, "
                                           "datasets save_to_disk folder or datasets hub id"})
    out: str = field(metadata={"help": "output folder (images/, index.jsonl, sample_manifest.json)"})
    lora: str | None = field(default=None, metadata={"help": "LoRA weights file or folder (pipe.load_lora_weights)"})
    lora_scale: float = field(default=1.0, metadata={"help": "LoRA strength"})
    vae: str | None = field(default=None, metadata={"help": "separate VAE (hub id or folder), e.g. the one a run "
                                                            "was trained with (train --vae)"})
    unet: str | None = field(default=None, metadata={"help": "full fine-tuned denoiser folder replacing the base one "
                                                             "(a run's unet/ or transformer/, or the run folder)"})
    revision: str | None = field(default=None, metadata={"help": "model revision (hub ids)"})
    variant: str | None = field(default=None, metadata={"help": "weights variant, e.g. fp16"})
    prompt_column: str | None = field(default=None, metadata={
        "help": "column holding the prompt; none = the first of prompt, caption, Prompt, text"})
    prompt_split: str = field(default="train", metadata={"help": "datasets split to read prompts from"})
    unique_prompts: bool = field(default=False, metadata={"help": "drop repeated prompts (keep the first)"})
    max_prompts: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "seeds; one image per prompt and seed"})
    steps: int = field(default=50, metadata={"help": "inference steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale (<= 1 disables it)"})
    scheduler: str = field(default="default", metadata={
        "help": "sampler, built from the pipeline's scheduler config", "choices": ["default", *SCHEDULERS]})
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt for every image"})
    height: int | None = field(default=None, metadata={"help": "image height; none = the model's default"})
    width: int | None = field(default=None, metadata={"help": "image width; none = the model's default"})
    batch_size: int = field(default=4, metadata={"help": "images per pipeline call, per process"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype", "choices": list(DTYPES)})
    device: str = field(default="auto", metadata={
        "help": "auto = each process's accelerator (GPU) when there is one, else cpu", "choices": ["auto", "cpu"]})

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds: repeated seeds in {self.seeds}")
        for name in ("steps", "batch_size", "max_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("guidance", "lora_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"--{name} must be a positive multiple of 8, got {value}")

    def settings(self) -> dict:
        """What determines an image besides its prompt and seed (checked when resuming). The LoRA
        counts by its content (`lora_sha256`); its path is kept for the record only."""
        keys = ("model", "lora", "lora_scale", "unet", "revision", "variant", "steps", "guidance", "scheduler",
                "negative_prompt", "height", "width", "dtype", "vae")
        return {**{k: getattr(self, k) for k in keys}, "lora_sha256": lora_sha256(self.lora)}


def image_name(prompt_index: int, seed: int) -> str:
    return f"{IMAGE_DIR}/{prompt_index:05d}_{seed}.png"


def read_index(folder: str | Path) -> list[dict]:
    """The rows of `folder/index.jsonl` (prompt, prompt_index, seed, file, model, settings)."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise MissingInputError(f"{path}: no sample index (run `ncppo sample --out {folder}` first)")
    return read_jsonl(path)


def read_jsonl(path: Path) -> list[dict]:
    """One dict per non-empty line; a bad line raises naming the file and line, except a last line
    without its newline (a write cut short by a crash), which is dropped with a warning."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if i == len(lines) and not text.endswith("\n"):
                    warnings.warn(f"{path}, line {i}: truncated last line ignored (a write cut short)", stacklevel=2)
                    break
                raise InputError(f"{path}, line {i}: not valid JSON ({err})") from None
    return rows


def _image_ok(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # unreadable or truncated: regenerate it
        return False


def check_sources(config: SampleConfig) -> None:
    """Fail on a missing model or LoRA before anything is written to --out."""
    from ..models import check_pipeline_folder, looks_like_path

    check_pipeline_folder(config.model, flag="--model")
    for flag, value in (("--lora", config.lora), ("--unet", config.unet), ("--vae", config.vae)):
        if value and looks_like_path(value) and not Path(value).exists():
            raise MissingInputError(f"{flag} {value}: no such file or folder")


IDENTITY_EXEMPT = ("lora",)  # recorded, not compared: a LoRA is identified by its content hash


def _check_resume(out: Path, config: SampleConfig, prompts: list[str]) -> None:
    """Refuse to add to a folder whose images were made with other settings or other prompts."""
    manifest = out / MANIFEST_FILE
    if manifest.is_file() and any((out / IMAGE_DIR).glob("*.png")):  # no image yet: nothing to protect
        try:
            recorded = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{manifest}: unreadable ({err}); use another --out") from None
        old = recorded.get("settings", {})
        changed = {k: (old.get(k), v) for k, v in config.settings().items()
                   if k not in IDENTITY_EXEMPT and k in old and old.get(k) != v}
        if changed:
            k, (was, now) = next(iter(changed.items()))
            raise InputError(f"{out} holds samples made with other settings ({k}: {was!r} there, {now!r} now); "
                             "use another --out")
        hashes = recorded.get("prompt_hashes") or []
        for i, (was, prompt) in enumerate(zip(hashes, prompts)):
            if was != prompt_hash(prompt):
                raise InputError(f"{out}: prompt {i} differs from the one its images were made for ({prompt!r} "
                                 "now); use another --out")
    if (out / INDEX_FILE).is_file():
        for row in read_index(out):
            i = row["prompt_index"]
            if i < len(prompts) and prompts[i] != row["prompt"]:
                raise InputError(f"{out / INDEX_FILE}: prompt {i} there is {row['prompt']!r} but the prompt "
                                 f"source gives {prompts[i]!r}; use another --out")


def _merged_hashes(out: Path, prompts: list[str]) -> list[str]:
    """The prompt hashes the manifest keeps: this run's, then those recorded for later indices that
    still have images (a run with fewer prompts must not forget what the other images were made for)."""
    hashes = [prompt_hash(p) for p in prompts]
    try:
        old = json.loads((out / MANIFEST_FILE).read_text()).get("prompt_hashes") or []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return hashes
    with_images = set()
    for f in (out / IMAGE_DIR).glob("*.png"):
        head = f.name.split("_", 1)[0]
        if head.isdigit():
            with_images.add(int(head))
    end = max((i + 1 for i in with_images if i < len(old)), default=0)
    return hashes + list(old[len(hashes):end])


def _all_agree(state, ok: bool) -> bool:
    """True only if `ok` on every process (also a barrier), so a refusal on the main process stops all."""
    if state.num_processes == 1:
        return ok
    from accelerate.utils import reduce

    flag = torch.tensor([0.0 if ok else 1.0], device=state.device)
    return bool(reduce(flag, reduction="sum").item() == 0)


def sampling_state(device: str):
    """accelerate's process state for sampling on `device` ("auto" or "cpu")."""
    from accelerate import PartialState

    # on a machine without GPUs, cpu=True is what makes accelerate set up gloo for several processes
    cpu = device == "cpu" or not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return PartialState(cpu=cpu)


def run_sample(config: SampleConfig, *, stage: str | None = None) -> Path:
    """Generate the missing images of (prompt, seed) for every prompt and seed, split across the
    accelerate processes, then write index.jsonl and the run manifest. Returns the output folder.
    `stage` names the caller's step in the progress bar (e.g. `round 0 (1/2) eval`)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from ..manifest import write_manifest

    state = sampling_state(config.device)
    out = Path(config.out)
    prompts = read_prompts(config.prompts, column=config.prompt_column, split=config.prompt_split,
                           unique=config.unique_prompts, limit=config.max_prompts)
    check_sources(config)
    settings = config.settings()
    error = None
    hashes = [prompt_hash(p) for p in prompts]
    if state.is_main_process:
        try:
            (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
            _check_resume(out, config, prompts)
            hashes = _merged_hashes(out, prompts)
            # the settings go down before the first image, so a crashed run is resumed only alike
            write_manifest(out / MANIFEST_FILE, command="sample", config=config, settings=settings,
                           prompt_hashes=hashes, status="running",
                           num_prompts=len(prompts), num_images=len(prompts) * len(config.seeds))
        except (OSError, InputError) as err:
            error = err
    if not _all_agree(state, error is None):
        raise error if error is not None else InputError(f"--out {out}: refused by the main process")
    items = [(i, s) for i in range(len(prompts)) for s in config.seeds]
    todo = [(i, s) for i, s in items if not _image_ok(out / image_name(i, s))]
    state.wait_for_everyone()  # everyone has listed the missing images before anyone writes one
    if state.is_main_process:
        print(f"ncppo sample: {len(items)} images, {len(items) - len(todo)} already there, "
              f"{len(todo)} to make on {state.num_processes} process(es)")
    with state.split_between_processes(todo) as mine:
        mine = list(mine)
    if mine:
        pipe = load_pipeline(config.model, lora=config.lora, lora_scale=config.lora_scale, unet=config.unet,
                             scheduler=config.scheduler, dtype=DTYPES[config.dtype], device=state.device,
                             revision=config.revision, variant=config.variant, vae=config.vae)
        bs = config.batch_size
        desc = f"{stage + ': ' if stage else ''}sampling (process {state.process_index})"
        for start in tqdm(range(0, len(mine), bs), desc=desc, unit="batch", disable=not state.is_local_main_process):
            chunk = mine[start:start + bs]
            images = sample_images(pipe, [prompts[i] for i, _ in chunk], [s for _, s in chunk], steps=config.steps,
                                   guidance=config.guidance, height=config.height, width=config.width,
                                   batch_size=bs, negative_prompt=config.negative_prompt, progress=False)
            for (i, s), image in zip(chunk, images):
                target = out / image_name(i, s)
                tmp = target.with_suffix(f".tmp{state.process_index}.png")
                image.save(tmp, format="PNG")
                os.replace(tmp, target)  # a crash never leaves a truncated PNG under the final name
    state.wait_for_everyone()
    if state.is_main_process:
        from ..manifest import atomic_write_text

        rows = [dict(prompt=prompts[i], prompt_index=i, seed=s, file=image_name(i, s), model=config.model,
                     settings=settings) for i, s in items]
        atomic_write_text(out / INDEX_FILE, "".join(json.dumps(r) + "\n" for r in rows))
        write_manifest(out / MANIFEST_FILE, command="sample", config=config, **dict(
            settings=settings, prompt_hashes=hashes, status="complete",
            num_prompts=len(prompts), num_images=len(items), generated=len(todo), num_processes=state.num_processes))
    state.wait_for_everyone()
    return out
