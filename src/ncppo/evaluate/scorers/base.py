"""The scorer interface and the transformers-CLIP plumbing shared by the CLIP-based scorers."""

from __future__ import annotations

from pathlib import Path

import torch


class Scorer:
    """A reward model: `score(images, prompts) -> Tensor (N,)`, higher is better.

    Subclasses load their weights once in `__init__` and implement `score` on one batch;
    callers split long lists into batches (see `score_in_batches`).
    """

    name: str = "scorer"

    def score(self, images: list, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: list, prompts: list[str]) -> torch.Tensor:
        return self.score(images, prompts)


def check_batch(images: list, prompts: list[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")


def score_in_batches(scorer, images: list, prompts: list[str], batch_size: int = 16, progress: bool = False):
    """`scorer.score` over `batch_size` chunks, concatenated to one float32 CPU tensor (N,)."""
    from tqdm.auto import tqdm

    check_batch(images, prompts)
    parts = [torch.zeros(0)]
    for start in tqdm(range(0, len(images), batch_size), desc=f"scoring {scorer.name}", unit="batch",
                      disable=not progress):
        end = start + batch_size
        parts.append(scorer.score(images[start:end], prompts[start:end]).detach().float().cpu().reshape(-1))
    return torch.cat(parts)


def pooled(output) -> torch.Tensor:
    """The projected embedding from `get_image_features` / `get_text_features` (a tensor in
    transformers 4, a model output with the projection in `pooler_output` in transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def has_processor_files(path) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "preprocessor_config.json").is_file()


def load_image_processor(path):
    """The PIL-backend CLIP image processor: it needs no torchvision and gives the same pixels
    whether or not torchvision is installed."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(path)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class CLIPBackbone:
    """A transformers CLIPModel with its tokenizer and image processor, embedding images and texts
    as L2-normalised projected features. Texts are padded to the full context length so a prompt's
    embedding does not depend on the other prompts of its batch."""

    def __init__(self, model, tokenizer, image_processor, device="cpu", dtype=torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device, self.dtype = torch.device(device), dtype
        self.max_length = min(int(tokenizer.model_max_length),
                              int(model.config.text_config.max_position_embeddings))

    @classmethod
    def from_pretrained(cls, path, processor=None, device="cpu", dtype=torch.float32):
        """Load a CLIPModel from `path` (folder or hub id); tokenizer and image processor from
        `processor` (default: `path`)."""
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(path, torch_dtype=dtype)
        proc = processor or path
        return cls(model, load_tokenizer(proc), load_image_processor(proc), device, dtype)

    @torch.no_grad()
    def image_embeds(self, images: list) -> torch.Tensor:
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        emb = pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        emb = pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                  attention_mask=tok["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def cosine(self, images: list, prompts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its own prompt, (N,)."""
        check_batch(images, prompts)
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
