"""Scorers load tiny random CLIP models from local folders and score batches; no downloads."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from ncppo.evaluate.scorers import SCORERS, get_scorer, score_in_batches

PROMPTS = ["a red circle", "a blue square", "a green tree", "a small dog", "a big house"]


def _images(n=5, size=32):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIPModel (text/vision width 32, projection 16, 32 px images) with tokenizer and
    PIL image processor, saved like a hub folder."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from ncppo.tiny import build_tokenizer

    tok = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _reference_cosine(folder, images, prompts):
    """Cosine of image and prompt through CLIPModel.forward (logits_per_image / logit scale)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    pix = CLIPImageProcessorPil.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pix)
    return out.logits_per_image.diagonal() / model.logit_scale.exp(), model


def _batch_invariant(scorer, images, prompts):
    whole = scorer.score(images, prompts)
    single = score_in_batches(scorer, images, prompts, batch_size=1)
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-5)
    return whole


def test_pickscore_is_scaled_cosine_and_batch_invariant(tiny_clip_dir):
    images = _images()
    cos, model = _reference_cosine(tiny_clip_dir, images, PROMPTS)
    scorer = get_scorer("pickscore", str(tiny_clip_dir))
    assert scorer.name == "pickscore"
    scores = _batch_invariant(scorer, images, PROMPTS)
    assert scores.shape == (5,)
    torch.testing.assert_close(scores, model.logit_scale.exp() * cos, rtol=1e-5, atol=1e-5)
    # the score depends on the prompt: swapping prompts changes it
    swapped = scorer.score(images, PROMPTS[::-1])
    assert not torch.allclose(swapped, scores)


def test_clip_score_is_100_cosine_clipped_at_zero(tiny_clip_dir):
    images = _images()
    cos, _ = _reference_cosine(tiny_clip_dir, images, PROMPTS)
    scores = _batch_invariant(get_scorer("clip", str(tiny_clip_dir)), images, PROMPTS)
    torch.testing.assert_close(scores, (100 * cos).clamp(min=0), rtol=1e-5, atol=1e-4)
    assert (scores >= 0).all()


@pytest.mark.parametrize("kind", ["v1-linear-safetensors", "mlp-pth"])
def test_aesthetic_head_on_normalised_image_embedding(tiny_clip_dir, tmp_path, kind):
    from transformers import CLIPImageProcessorPil, CLIPModel

    g = torch.Generator().manual_seed(1)
    if kind == "mlp-pth":  # keys layers.0 / .2 / .10: layer order is numeric, not alphabetical
        dims = [(16, 8), (8, 4), (4, 1)]
        state = {f"layers.{i}.{p}": torch.randn(o, n, generator=g) if p == "weight" else torch.randn(o, generator=g)
                 for i, (n, o) in zip((0, 2, 10), dims) for p in ("weight", "bias")}
        head = tmp_path / "head.pth"
        torch.save(state, head)
        chain = [(state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]) for i in (0, 2, 10)]
    else:
        from safetensors.torch import save_file

        state = {"weight": torch.randn(1, 16, generator=g), "bias": torch.randn(1, generator=g)}
        head = tmp_path / "head.safetensors"
        save_file(state, str(head))
        chain = [(state["weight"], state["bias"])]
    images = _images()
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pix = CLIPImageProcessorPil.from_pretrained(tiny_clip_dir)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        x = model.vision_model(pixel_values=pix).pooler_output
        x = model.visual_projection(x)
        x = x / x.norm(dim=-1, keepdim=True)
        for w, b in chain:
            x = x @ w.T + b
    scorer = get_scorer("aesthetic", str(head), clip_model=str(tiny_clip_dir))
    scores = _batch_invariant(scorer, images, PROMPTS)
    torch.testing.assert_close(scores, x[:, 0], rtol=1e-5, atol=1e-5)
    # the aesthetic score ignores the prompt
    torch.testing.assert_close(scorer.score(images, PROMPTS[::-1]), scores)


def test_aesthetic_refuses_head_of_wrong_width(tiny_clip_dir, tmp_path):
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, tmp_path / "h.pth")
    with pytest.raises(ValueError, match="768-d"):
        get_scorer("aesthetic", str(tmp_path / "h.pth"), clip_model=str(tiny_clip_dir))


# ------------------------------------------------------------------ HPSv2: an open_clip-layout reference
class _Block(nn.Module):
    def __init__(self, w, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, heads)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(w, 4 * w), gelu=nn.GELU(), c_proj=nn.Linear(4 * w, w)))

    def forward(self, x, mask=None):  # (L, N, W), as open_clip's ResidualAttentionBlock
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Tower(nn.Module):
    def __init__(self, w, heads, layers):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(w, heads) for _ in range(layers))


class _Visual(nn.Module):
    def __init__(self, w=32, heads=2, layers=2, patch=8, size=32, embed=16):
        super().__init__()
        n = (size // patch) ** 2 + 1
        self.conv1 = nn.Conv2d(3, w, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * 0.5)
        self.positional_embedding = nn.Parameter(torch.randn(n, w) * 0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(w), nn.LayerNorm(w)
        self.transformer = _Tower(w, heads, layers)
        self.proj = nn.Parameter(torch.randn(w, embed) * 0.2)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.positional_embedding
        x = self.ln_pre(x).transpose(0, 1)
        for blk in self.transformer.resblocks:
            x = blk(x)
        return self.ln_post(x.transpose(0, 1)[:, 0]) @ self.proj


class _OpenClipLike(nn.Module):
    def __init__(self, vocab, ctx=16, w=32, heads=2, layers=2, embed=16):
        super().__init__()
        self.visual = _Visual(embed=embed)
        self.transformer = _Tower(w, heads, layers)
        self.token_embedding = nn.Embedding(vocab, w)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, w) * 0.1)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.randn(w, embed) * 0.2)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu(1))

    def encode_text(self, ids, eos_id):
        x = (self.token_embedding(ids) + self.positional_embedding).transpose(0, 1)
        for blk in self.transformer.resblocks:
            x = blk(x, self.attn_mask)
        x = self.ln_final(x.transpose(0, 1))
        # open_clip pools at argmax(id) (the EOT id is the largest in its vocab); the tiny vocab's EOT
        # is id 1, so pool at the first EOT, which is the same position in the real vocabulary
        return x[torch.arange(len(ids)), (ids == eos_id).int().argmax(-1)] @ self.text_projection


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    import json

    from ncppo.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(3)
    ref = _OpenClipLike(len(tok)).eval()
    for p in ref.parameters():  # LayerNorm weights are 1/0 by default: perturb so a swapped name shows
        if p.ndim == 1:
            p.data += 0.1 * torch.randn_like(p)
    folder = tmp_path_factory.mktemp("tiny-hps")
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, folder / "HPS_tiny.pt")
    tok.save_pretrained(folder)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": len(tok), "width": 32, "heads": 2, "layers": 2}}))
    return folder, ref, tok


def test_hpsv2_converted_checkpoint_matches_open_clip_layout_reference(tiny_hps):
    from ncppo.evaluate.scorers.hpsv2 import OPENAI_MEAN, OPENAI_STD

    folder, ref, tok = tiny_hps
    images = _images()
    pix = torch.tensor(np.stack([np.asarray(im, np.float32) / 255 for im in images])).permute(0, 3, 1, 2)
    pix = (pix - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]
    ids = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = nn.functional.normalize(ref.visual(pix), dim=-1)
        txt = nn.functional.normalize(ref.encode_text(ids, tok.eos_token_id), dim=-1)
    expected = (img * txt).sum(-1)
    for name in ("hpsv2", "hpsv2.1"):
        scorer = get_scorer(name, str(folder / "HPS_tiny.pt"))
        assert scorer.name == name
        scores = _batch_invariant(scorer, images, PROMPTS)
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    assert expected.std() > 0.01  # the check would be weak if every score were the same


def test_hpsv2_rejects_checkpoint_of_other_shape(tiny_hps, tmp_path):
    folder, ref, _ = tiny_hps
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("visual.transformer.resblocks.1.")}
    torch.save(state, tmp_path / "broken.pt")
    (tmp_path / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
    with pytest.raises(ValueError, match="missing vision_model.encoder.layers.1"):
        get_scorer("hpsv2", str(tmp_path / "broken.pt"), tokenizer=str(folder))


def test_imagereward_missing_package_message():
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install 'ncppo\\[imagereward\\]'"):
            get_scorer("imagereward")
    else:
        pytest.skip("image-reward is installed")


def test_registry_names_and_unknown_scorer():
    assert {"pickscore", "hpsv2", "hpsv2.1", "imagereward", "clip", "aesthetic", "toy-judge"} <= set(SCORERS)
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        get_scorer("nope")


def test_toy_judge_through_registry():
    pytest.importorskip("ncppo.toy.judge")
    from ncppo.toy import world

    scorer = get_scorer("toy-judge")
    assert scorer.name == "toy-judge"
    prompts = ["a red circle on a white background", "a blue square on a black background",
               "a green triangle on a gray background"]
    images = [world.render_prompt(p, seed=0) for p in prompts]
    scores = scorer.score(images, prompts)
    assert scores.shape == (3,)
    torch.testing.assert_close(score_in_batches(scorer, images, prompts, 1), scores.float().cpu())


def test_score_command_writes_and_merges_columns(tiny_clip_dir, tmp_path):
    import csv
    import json

    from ncppo.cli import main
    from ncppo.evaluate.score import read_scores

    folder = tmp_path / "samples"
    (folder / "images").mkdir(parents=True)
    images = _images(3)
    with open(folder / "index.jsonl", "w") as fh:
        for i, (im, p) in enumerate(zip(images, PROMPTS)):
            im.save(folder / f"images/{i:05d}_0.png")
            fh.write(json.dumps(dict(prompt=p, prompt_index=i, seed=0, file=f"images/{i:05d}_0.png")) + "\n")
    clip = str(tiny_clip_dir)
    assert main(["score", str(folder), "--scorer", "clip,pickscore", "--scorer-path", f"{clip},{clip}",
                 "--batch-size", "2"]) == 0
    rows = read_scores(folder)
    direct = get_scorer("pickscore", clip).score(images, PROMPTS[:3])
    np.testing.assert_allclose([r["pickscore"] for r in rows], direct.numpy(), rtol=1e-5)
    assert [r["prompt"] for r in rows] == PROMPTS[:3]
    # a second run adds a column and keeps the first ones
    torch.save({"weight": torch.ones(1, 16), "bias": torch.zeros(1)}, tmp_path / "head.pth")
    assert main(["score", str(folder), "--scorer", "aesthetic", "--scorer-path", str(tmp_path / "head.pth"),
                 "--scorer-option", f"clip_model={clip}"]) == 0
    rows2 = read_scores(folder)
    assert [r["pickscore"] for r in rows2] == [r["pickscore"] for r in rows]
    assert all(isinstance(r["aesthetic"], float) for r in rows2)
    with open(folder / "scores.csv") as fh:
        header = next(csv.reader(fh))
    assert header == ["prompt_index", "seed", "prompt", "file", "aesthetic", "clip", "pickscore"]
    manifest = json.loads((folder / "score_manifest.json").read_text())
    assert set(manifest["runs"]) == {"clip", "pickscore", "aesthetic"}
