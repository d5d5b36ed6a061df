"""A run's own LoRA file loads whole: `pipe.load_lora_weights(RUN)` and `(RUN/checkpoint-N)` give the trained
denoiser, for the default targets and for every kind of module `--lora-targets` can name (attention, feed-forward,
norm and embedding Linears, Conv2d), on tiny SD, SDXL, SD3 and FLUX. Any diffusers/peft warning while loading fails.

The trained denoiser is rebuilt independently of diffusers' LoRA loader: the base denoiser, peft's
`add_adapter` with the run's LoraConfig, and the checkpoint's peft-keyed `lora_adapter.safetensors` (what
resuming reads). One training step at a large learning rate makes the LoRA move the output by 0.09-2.1."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ncppo.cli import main
from ncppo.lora import adapters_disabled
from ncppo.models import FAMILIES as ADAPTERS
from ncppo.publish.run import WEIGHTS_FILE
from ncppo.train.checkpoint import LORA_FILE
from ncppo.train.config import TrainConfig
from ncppo.train.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

RANK, ALPHA = 4, 8.0  # alpha != rank: a file that lost its alpha would load 2x too strong
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
JOINT = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# Every module kind of each denoiser (the README and --help let --lora-targets name any of its Linear/Conv2d).
EVERY_KIND = {
    "unet": ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                         "time_emb_proj", "conv_in", "conv_out", "downsamplers.0.conv", "upsamplers.0.conv",
                         "linear_1", "linear_2"],  # linear_*: the time (and SDXL's added) embeddings
    "sd3": ATTENTION + JOINT + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                "norm1.linear", "norm1_context.linear", "norm_out.linear", "proj_out",
                                "context_embedder", "pos_embed.proj", "linear_1", "linear_2"],
    "flux": ATTENTION + JOINT + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                 "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear",
                                 "proj_mlp", "proj_out", "context_embedder", "x_embedder", "linear_1", "linear_2"],
}
FAMILIES = {"sd": ("tiny_sd_path", "unet"), "sdxl": ("tiny_sdxl_path", "unet"), "sd3": ("tiny_sd3_path", "sd3"),
            "flux": ("tiny_flux_path", "flux")}
STEP = 1


@pytest.fixture(scope="module", params=[(f, t) for f in FAMILIES for t in ("default", "every-kind")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def run(request, pairs_parquet, tmp_path_factory):
    """A run trained by `ncppo train` for one step (checkpoint-1 and the final file), and its targets."""
    family, which = request.param
    fixture, kinds = FAMILIES[family]
    model = request.getfixturevalue(fixture)
    targets = None if which == "default" else EVERY_KIND[kinds]
    out = tmp_path_factory.mktemp(f"run-{family}-{which}") / "run"
    train(TrainConfig(model=str(model), data=str(pairs_parquet), output_dir=str(out), resolution=32, batch_size=2,
                      lora_rank=RANK, lora_alpha=ALPHA, lora_targets=targets, objective="sft", space="latent",
                      max_steps=STEP, checkpoint_every=STEP, learning_rate=5e-2, report_to="none", seed=0))
    return family, model, out, targets


def pipeline(model):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def output(net, family):
    """The denoiser's prediction on fixed inputs (two samples, two noise levels)."""
    g, c = torch.Generator().manual_seed(1), net.config
    text = torch.randn(2, 6, c.get("cross_attention_dim") or c.get("joint_attention_dim"), generator=g)
    with torch.no_grad():
        if family in ("sd", "sdxl"):
            added = None
            if family == "sdxl":
                pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
                added = {"text_embeds": torch.randn(2, pooled, generator=g),
                         "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
            x = torch.randn(2, c.in_channels, 8, 8, generator=g)
            return net(x, torch.tensor([10, 700]), encoder_hidden_states=text, added_cond_kwargs=added).sample
        pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
        if family == "sd3":
            x = torch.randn(2, c.in_channels, 8, 8, generator=g)
            return net(x, encoder_hidden_states=text, pooled_projections=pooled,
                       timestep=torch.tensor([100.0, 900.0])).sample
        x = torch.randn(2, 16, c.in_channels, generator=g)  # FLUX: a packed 4x4 token grid
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                              -1).reshape(16, 3)
        return net(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([0.1, 0.9]),
                   img_ids=img_ids, txt_ids=torch.zeros(6, 3), guidance=torch.tensor([3.5, 3.5])).sample


def lora_modules(net) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, m in net.named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def no_loader_warnings(pipe):
    """Fail on any Python warning, and on any diffusers log record at WARNING or above, except diffusers'
    notice that the text encoders got no LoRA keys (true of every denoiser-only LoRA)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    encoders = {type(m).__name__ for n, m in pipe.components.items() if n.startswith("text_encoder") and m is not None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [r.getMessage() for r in records]
    unexpected = [m for m in messages
                  if not any(m.startswith(f"No LoRA keys associated to {cls} found with the prefix='text_encoder")
                             for cls in encoders)]
    assert not unexpected, unexpected


def test_run_and_checkpoint_files_load_as_the_trained_denoiser(run, tmp_path):
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    family, model, out, targets = run
    checkpoint = out / f"checkpoint-{STEP}"

    # The trained denoiser, from the checkpoint's peft keys (no diffusers LoRA loader involved).
    trained = denoiser(pipeline(model))
    denoiser_cls, component = type(trained), ADAPTERS[family].lora_component
    targets = targets or list(ADAPTERS[family].default_lora_targets)
    trained.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    result = set_peft_model_state_dict(trained, load_file(checkpoint / LORA_FILE))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    adapted = lora_modules(trained)
    for target in targets:  # each kind named is really adapted (peft matches dotted suffixes)
        assert any(name == target or name.endswith("." + target) for name in adapted), target
    ref = output(trained, family)
    with adapters_disabled(trained):
        effect = (ref - output(trained, family)).abs().max().item()
    assert effect > 0.05, effect  # the LoRA matters

    for where in (out, checkpoint):
        pipe = pipeline(model)
        with no_loader_warnings(pipe):
            pipe.load_lora_weights(str(where))  # the folder itself, default weight name
        net = denoiser(pipe)
        assert isinstance(net, denoiser_cls) and lora_modules(net) == adapted, where.name
        diff = (output(net, family) - ref).abs().max().item()
        assert diff <= 1e-4 * effect, (where.name, diff, effect)

    # One key style, the file `ncppo export --format diffusers` writes (same tensors), and what the card says.
    exported = tmp_path / "export.safetensors"
    assert main(["export", str(out), "--format", "diffusers", "--out", str(exported)]) == 0
    ours, theirs = load_file(out / WEIGHTS_FILE), load_file(exported)
    assert ours.keys() == theirs.keys() == load_file(checkpoint / WEIGHTS_FILE).keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(k.startswith(component + ".") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in ours)
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as fh:
        config = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert (config[f"{component}.r"], config[f"{component}.lora_alpha"]) == (RANK, ALPHA)
    assert f'load_lora_weights("PATH_OR_REPO_OF_THIS_FOLDER", weight_name="{WEIGHTS_FILE}")' in (
        out / "README.md").read_text()
