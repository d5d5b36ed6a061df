"""HPSv2 / HPSv2.1 (Wu et al. 2023) without open_clip.

The checkpoints (HPS_v2_compressed.pt, HPS_v2.1_compressed.pt) are open_clip ViT-H-14 state dicts.
open_clip needs torchvision, so the weights are mapped onto the same architecture in transformers'
CLIPModel (open_clip's VisionTransformer / TextTransformer are OpenAI CLIP's layout: fused qkv
projections are split, projections transposed). Preprocessing matches open_clip's evaluation
transform: bicubic resize of the short side, centre crop, OpenAI mean/std. The score is HPSv2's:
the cosine of the normalised image and prompt embeddings (no logit scale).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .base import CLIPBackbone, Scorer, load_tokenizer
from .weights import load_state_dict

HUB_REPO = "xswu/HPSv2"
HUB_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
TOKENIZER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CONFIG_FILE = "open_clip_config.json"
# open_clip's ViT-H-14.json
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_config_from_open_clip(cfg: dict, tokenizer=None):
    """A transformers CLIPConfig for an open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`)."""
    from transformers import CLIPConfig

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    eos = tokenizer.eos_token_id if tokenizer is not None else 49407
    bos = tokenizer.bos_token_id if tokenizer is not None else 49406
    text = dict(vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=int(t.get("mlp_ratio", 4) * t["width"]),
                num_hidden_layers=t["layers"], num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
                hidden_act=act, layer_norm_eps=1e-5, projection_dim=cfg["embed_dim"], eos_token_id=eos,
                bos_token_id=bos, pad_token_id=0)
    vision = dict(hidden_size=v["width"], intermediate_size=int(v.get("mlp_ratio", 4) * v["width"]),
                  num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v.get("head_width", 64),
                  image_size=v["image_size"], patch_size=v["patch_size"], hidden_act=act, layer_norm_eps=1e-5,
                  projection_dim=cfg["embed_dim"])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg["embed_dim"])


_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def convert_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip (OpenAI-layout) CLIP state dict to transformers' CLIPModel names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif m := _RESBLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            else:
                module, param = rest.rsplit(".", 1)
                if module not in _BLOCK:
                    raise KeyError(f"unexpected open_clip parameter {key!r}")
                out[f"{prefix}{_BLOCK[module]}.{param}"] = value
        elif key in ("attn_mask", "visual.attn_mask"):
            continue  # a buffer: transformers builds the causal mask itself
        else:
            raise KeyError(f"unexpected open_clip parameter {key!r} (not a ViT CLIP checkpoint?)")
    return out


def _resolve(path: str | None, name: str) -> Path:
    if path is None:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(HUB_REPO, HUB_FILES[name]))
        except Exception as err:  # offline or missing: say what to pass instead
            raise FileNotFoundError(f"{name}: pass --scorer-path to {HUB_FILES[name]} (from the {HUB_REPO} "
                                    f"hub repo); downloading it failed: {err}") from None
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.pt")) + sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
        if len(found) != 1:
            raise FileNotFoundError(f"{p}: expected one checkpoint (.pt/.safetensors/.bin), found {len(found)}")
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such HPSv2 checkpoint")
    return p


class HPSv2(Scorer):
    """HPSv2 (`name="hpsv2"`) or HPSv2.1 (`name="hpsv2.1"`): `path` is the checkpoint file (or a folder
    holding it). `tokenizer`: a CLIP tokenizer folder or hub id (default: the checkpoint's folder when it
    holds one, else the LAION ViT-H-14 one). `config`: an open_clip model config JSON (default:
    open_clip_config.json beside the checkpoint, else ViT-H-14)."""

    name = "hpsv2"

    def __init__(self, path: str | None = None, device="cpu", dtype=torch.float32, name: str = "hpsv2",
                 tokenizer: str | None = None, config: str | None = None):
        from transformers import CLIPImageProcessorPil, CLIPModel

        self.name = name
        ckpt = _resolve(path, name)
        config_path = Path(config) if config else ckpt.parent / CONFIG_FILE
        cfg = json.loads(config_path.read_text()) if config_path.is_file() else VIT_H_14
        if tokenizer is None:
            tokenizer = str(ckpt.parent) if (ckpt.parent / "tokenizer_config.json").is_file() else TOKENIZER_ID
        tok = load_tokenizer(tokenizer)
        size = cfg["vision_cfg"]["image_size"]
        processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                          resample=3, image_mean=OPENAI_MEAN, image_std=OPENAI_STD)
        model = CLIPModel(clip_config_from_open_clip(cfg, tok))
        state = convert_open_clip_state_dict(load_state_dict(ckpt))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{ckpt}: does not match the open_clip config "
                             f"({'missing ' + ', '.join(missing[:5]) if missing else ''}"
                             f"{' unexpected ' + ', '.join(unexpected[:5]) if unexpected else ''})")
        self.clip = CLIPBackbone(model, tok, processor, device, dtype)

    def score(self, images, prompts) -> torch.Tensor:
        return self.clip.cosine(images, prompts).cpu()
