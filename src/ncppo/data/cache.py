"""`ncppo data cache`: VAE latents (and optionally text embeddings) of every pair, precomputed.

Layout of a cache folder:
  cache_info.json                 format tag, model, resolution, latent shape, options, counts (written last)
  index.parquet                   one row per pair in dataset order: position, row, caption, label
                                  (the oriented p = max(label_0, 1 - label_0), 0.5 for a tie),
                                  shard, offset, original_sizes, crops_top_left(_flipped)
  shard-p<rank>-<k>.safetensors   latents (n,2,C,h,w) winner first [, latents_flipped]
                                  [, encoder_hidden_states (n,L,D)] [, pooled_prompt_embeds (n,D)]

Latents are the VAE posterior mean (deterministic), of the center crop without flip, so training
from the cache equals training from the images with augmentations off. A flipped latent is not
the flip of a latent (the VAE is not mirror-equivariant), so `--hflip-latents` encodes the
mirrored images too and training with --hflip then picks one of the two per (seed, epoch, index).
Several processes (`accelerate launch -m ncppo data cache ...`) each encode a contiguous slice.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..configs import option
from ..errors import InputError, OutputExistsError
from .dataset import PreferenceDataset, collate_pairs
from .pairs import BadRowError, open_pairs
from .transforms import Placement, mirrored_crop

CACHE_FORMAT = "ncppo-latent-cache"
CACHE_VERSION = 1
INFO_FILE = "cache_info.json"
INDEX_FILE = "index.parquet"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}




@dataclass
class CacheConfig:
    """Flags of `ncppo data cache`."""

    data: str = field(metadata={"help": "Pair source to encode (any source `ncppo train --data` reads).", "cli": False})
    model: str = field(metadata={"help": "Diffusers pipeline whose VAE (and text encoders) encode: hub id or folder."})
    out: str = field(metadata={"help": "Output cache folder (pass it to `ncppo train --data`)."})
    resolution: int = option(512, "Training resolution: shorter side resized to it, then center crop.")
    split: str = option("train", "Split to read.")
    image_dir: str | None = option(None, "Image folder for CSV/JSONL sources.")
    family: str = option("auto", "Model family; auto reads model_index.json.", choices=("auto", "sd", "sdxl", "sd3", "flux"))
    vae: str | None = option(None, "Optional separate VAE (hub id or folder), e.g. the fp16-fix SDXL VAE.")
    revision: str | None = option(None, "Model revision on the hub.")
    variant: str | None = option(None, "Weight file variant, e.g. fp16.")
    hflip_latents: bool = option(False, "Also encode the mirrored images, so training with --hflip can use the cache.")
    text_embeddings: bool = option(False, "Also store text-encoder outputs, pooled ones included (SDXL, SD3: CLIP + T5 "
                                          "states; FLUX: T5 states, CLIP pooled); training then skips the text encoders.")
    keep_ties: bool = option(False, "Also cache tie pairs (label 0.5); training drops them unless --keep-ties.")
    batch_size: int = option(8, "Pairs encoded per VAE call.")
    shard_pairs: int = option(1024, "Pairs per safetensors shard.")
    dtype: str = option("float32", "Storage dtype of the latents (float32 keeps the cache exact).", choices=tuple(DTYPES))
    limit: int | None = option(None, "Cache only the first N pairs.")
    overwrite: bool = option(False, "Replace an existing output folder.")

    def validate(self) -> None:
        from ..configs import ConfigError

        for name in ("resolution", "batch_size", "shard_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8, got {self.resolution}")


def is_latent_cache(path) -> bool:
    """True for a complete folder written by `ncppo data cache`."""
    info = Path(str(path)) / INFO_FILE
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("format") == CACHE_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def partial_cache_reason(path) -> str | None:
    """Why `path` looks like a latent cache that is not complete (None if it does not look like one):
    shards or an index written by `ncppo data cache` but no valid cache_info.json (written last)."""
    folder = Path(str(path))
    if not folder.is_dir() or is_latent_cache(folder):
        return None
    if (folder / INFO_FILE).is_file():
        return f"{INFO_FILE} is unreadable or not an ncppo latent cache's; rebuild with `ncppo data cache --overwrite`"
    if any(folder.glob("shard-p*.safetensors")):
        return (f"a half-written latent cache (shards but no {INFO_FILE}, which is written last): the cache run "
                "stopped early; rebuild it with `ncppo data cache --overwrite`")
    return None


def _placements(item: dict[str, Any]) -> list[Placement]:
    return [Placement(tuple(item["original_sizes"][k].tolist()), tuple(item["crops_top_left"][k].tolist()))
            for k in (0, 1)]


def cache_latents(source, model, out, *, resolution: int = 512, split: str = "train", image_dir: str | None = None,
                  family: str = "auto", vae: str | None = None, revision: str | None = None,
                  variant: str | None = None, hflip_latents: bool = False, text_embeddings: bool = False,
                  keep_ties: bool = False, batch_size: int = 8, shard_pairs: int = 1024, dtype: str = "float32",
                  limit: int | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Encode every pair of `source` with `model` (a path/id, or a loaded ModelAdapter) into `out`.

    Runs in every process of an accelerate launch: each takes a contiguous slice of the pairs.
    Returns the cache info (also written to `out/cache_info.json` by the main process).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from safetensors.torch import save_file

    from ..publish.files import follow_umask

    # PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU: without cpu=True, CPU processes
    # started by torchrun would each think they are alone
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    out = Path(out)
    from .curate import check_out_apart

    check_out_apart(out, (getattr(source, "source", source), "the source"), (image_dir, "--image-dir"),
                    (model, "--model"), (vae, "--vae"))
    if state.is_main_process:
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise OutputExistsError(f"--out {out} exists and is not empty (use --overwrite)")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    if isinstance(model, (str, Path)):
        from ..models import load_model

        adapter = load_model(str(model), family=family, vae=vae, revision=revision, variant=variant,
                             device=state.device)
        model_name = str(model)
    else:
        adapter, model_name = model, getattr(model, "model_path", "<adapter>")
    table = open_pairs(source, split=split, image_dir=image_dir)
    dataset = PreferenceDataset(table, resolution, crop="center", hflip=False, keep_ties=keep_ties)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    with state.split_between_processes(list(range(n))) as mine:
        positions = list(mine)

    store = DTYPES[dtype]
    index: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    shard: dict[str, list[torch.Tensor]] = {}
    shard_count, in_shard = 0, 0

    def flush():
        nonlocal shard, shard_count, in_shard
        if not in_shard:
            return
        name = f"shard-p{state.process_index:03d}-{shard_count:05d}.safetensors"
        save_file({k: torch.cat(v).contiguous() for k, v in shard.items()}, str(out / name),
                  metadata={"format": CACHE_FORMAT})
        follow_umask(out / name)  # safetensors writes 0600; a cache is shared like any other output
        shard, in_shard = {}, 0
        shard_count += 1

    bar = tqdm(total=len(positions), desc=f"cache (process {state.process_index})", unit="pair",
               disable=not progress or not state.is_local_main_process)
    for b0 in range(0, len(positions), batch_size):
        items, item_pos = [], []
        for pos in positions[b0:b0 + batch_size]:
            try:
                items.append(dataset.load_item(pos))
                item_pos.append(pos)
            except BadRowError as err:  # a bad row is left out of the cache, and named
                skipped.append({"position": pos, "row": err.row, "reason": err.reason})
        bar.update(len(positions[b0:b0 + batch_size]))
        if not items:
            continue
        batch = collate_pairs(items)
        pix = batch["pixel_values"]
        tensors = {"latents": adapter.encode_images(pix.flatten(0, 1)).unflatten(0, pix.shape[:2])}
        if hflip_latents:
            flipped = pix.flip(-1)  # the center crop of the mirrored image is the mirrored center crop
            tensors["latents_flipped"] = adapter.encode_images(flipped.flatten(0, 1)).unflatten(0, pix.shape[:2])
        if text_embeddings:
            with torch.no_grad():
                cond = adapter.encode_prompts(batch["captions"])
            tensors["encoder_hidden_states"] = cond.encoder_hidden_states
            if cond.pooled is not None:
                tensors["pooled_prompt_embeds"] = cond.pooled
        for j, (pos, item) in enumerate(zip(item_pos, items)):
            if in_shard == shard_pairs:
                flush()
            for key, value in tensors.items():
                shard.setdefault(key, []).append(value[j:j + 1].detach().to("cpu", store))
            places = _placements(item)
            index.append({
                "position": pos, "row": item["row"], "caption": item["caption"], "label": item["label"],
                "shard": f"shard-p{state.process_index:03d}-{shard_count:05d}.safetensors", "offset": in_shard,
                "original_sizes": [v for p in places for v in p.original_size],
                "crops_top_left": [v for p in places for v in p.crop_top_left],
                "crops_top_left_flipped": [v for p in places for v in mirrored_crop(p, resolution)],
            })
            in_shard += 1
    flush()
    bar.close()

    import pyarrow as pa
    import pyarrow.parquet as pq

    part = out / f"index-p{state.process_index:03d}.parquet"
    pq.write_table(pa.Table.from_pylist(index, schema=_INDEX_SCHEMA), part)
    (out / f"skipped-p{state.process_index:03d}.json").write_text(json.dumps(skipped))
    state.wait_for_everyone()

    info: dict[str, Any] = {}
    if state.is_main_process:
        parts = sorted(out.glob("index-p*.parquet"))
        merged = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("position")
        pq.write_table(merged, out / INDEX_FILE)
        all_skipped = [s for p in sorted(out.glob("skipped-p*.json")) for s in json.loads(p.read_text())]
        for p in parts + sorted(out.glob("skipped-p*.json")):
            p.unlink()
        latent_shape = None
        if merged.num_rows:
            from safetensors import safe_open

            with safe_open(str(out / merged.column("shard")[0].as_py()), framework="pt") as fh:
                latent_shape = list(fh.get_slice("latents").get_shape()[2:])
        info = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "model": model_name,
                "family": getattr(adapter, "family", None), "resolution": resolution, "latent_shape": latent_shape,
                "dtype": dtype, "hflip_latents": hflip_latents, "text_embeddings": text_embeddings,
                "keep_ties": keep_ties, "source": table.source, "split": split, "pairs": merged.num_rows,
                "skipped": all_skipped, "dataset_stats": dataset.stats, "processes": state.num_processes}
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    state.wait_for_everyone()
    return info


def _index_schema():
    import pyarrow as pa

    ints = pa.list_(pa.int64())
    return pa.schema([("position", pa.int64()), ("row", pa.int64()), ("caption", pa.string()),
                      ("label", pa.float64()), ("shard", pa.string()), ("offset", pa.int64()),
                      ("original_sizes", ints), ("crops_top_left", ints), ("crops_top_left_flipped", ints)])


_INDEX_SCHEMA = _index_schema()


class LatentCacheDataset(torch.utils.data.Dataset):
    """Items of a latent cache: the `PreferenceDataset` item dict with `latents (2,C,h,w)` (winner
    first) instead of `pixel_values`, plus `encoder_hidden_states` / `pooled_prompt_embeds` when
    cached and `use_text_embeddings`.

    With `hflip`, each item uses the mirrored latents with probability 1/2, drawn from
    (seed, epoch, index) exactly like `PreferenceDataset`, so flips match the image path.
    """

    def __init__(self, path, *, hflip: bool = False, keep_ties: bool = False, seed: int = 0,
                 use_text_embeddings: bool = True):
        import pyarrow.parquet as pq

        self.path = Path(str(path))
        if not is_latent_cache(self.path):
            raise InputError(f"{self.path}: not a complete latent cache (no {INFO_FILE}); build it with `ncppo data cache`")
        self.info = json.loads((self.path / INFO_FILE).read_text())
        if hflip and not self.info.get("hflip_latents"):
            raise InputError(f"{self.path}: --hflip needs mirrored latents, but this cache has none (a flipped latent "
                             "is not the latent of the flipped image); rebuild it with `ncppo data cache --hflip-latents`")
        self.resolution = int(self.info["resolution"])
        self.hflip, self.keep_ties, self.seed, self.epoch = bool(hflip), bool(keep_ties), int(seed), 0
        self.use_text = bool(use_text_embeddings and self.info.get("text_embeddings"))
        index = pq.read_table(self.path / INDEX_FILE).to_pydict()
        labels = np.asarray(index["label"], dtype=np.float64)
        keep = np.flatnonzero(labels != 0.5) if not keep_ties else np.arange(len(labels))
        self.index = {k: [v[i] for i in keep] for k, v in index.items()}
        kept = labels[keep]
        self.stats = {"pairs": len(keep), "ties_dropped": int(len(labels) - len(keep)),
                      "soft_labels": int(((kept > 0.5) & (kept < 1)).sum()),
                      "skipped_when_cached": len(self.info.get("skipped", [])), "cache": str(self.path),
                      "model": self.info.get("model"), "resolution": self.resolution}
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index["position"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _tensor(self, shard: str, name: str, offset: int) -> torch.Tensor:
        from safetensors import safe_open

        if shard not in self._handles:  # opened lazily: handles do not cross DataLoader worker forks
            self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
        return self._handles[shard].get_slice(name)[offset].float()

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        shard, offset = self.index["shard"][i], int(self.index["offset"][i])
        flip = False
        if self.hflip:
            _, f = np.random.default_rng([self.seed, self.epoch, i]).random(2)
            flip = bool(f < 0.5)
        crops = self.index["crops_top_left_flipped" if flip else "crops_top_left"][i]
        item = {
            "latents": self._tensor(shard, "latents_flipped" if flip else "latents", offset),
            "caption": self.index["caption"][i],
            "label": float(self.index["label"][i]),
            "original_sizes": torch.tensor(self.index["original_sizes"][i], dtype=torch.long).view(2, 2),
            "crops_top_left": torch.tensor(crops, dtype=torch.long).view(2, 2),
            "row": int(self.index["row"][i]),
            "skipped": [],
        }
        if self.use_text:
            item["encoder_hidden_states"] = self._tensor(shard, "encoder_hidden_states", offset)
            if "pooled_prompt_embeds" in self._handles[shard].keys():
                item["pooled_prompt_embeds"] = self._tensor(shard, "pooled_prompt_embeds", offset)
        return item

    def meta(self, i: int) -> tuple:
        return (int(self.index["row"][i]), self.index["caption"][i], float(self.index["label"][i]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def run_cache(config: CacheConfig, *, progress: bool = True) -> tuple[dict[str, Any], int]:
    """`ncppo data cache`: build the cache and print what was written."""
    info = cache_latents(config.data, config.model, config.out, resolution=config.resolution, split=config.split,
                         image_dir=config.image_dir, family=config.family, vae=config.vae, revision=config.revision,
                         variant=config.variant, hflip_latents=config.hflip_latents,
                         text_embeddings=config.text_embeddings, keep_ties=config.keep_ties,
                         batch_size=config.batch_size, shard_pairs=config.shard_pairs, dtype=config.dtype,
                         limit=config.limit, overwrite=config.overwrite, progress=progress)
    if info:
        print(f"cached {info['pairs']} pairs ({len(info['skipped'])} bad rows skipped) of {info['source']} at "
              f"{info['resolution']} px, latents {info['latent_shape']} -> {config.out}")
    return info, 0
