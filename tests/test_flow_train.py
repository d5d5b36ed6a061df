"""Training SD3 and FLUX through the one training path: each objective in each space moves the LoRA the
way its loss says; LoRA files load in the stock pipelines and change their output; full fine-tuning;
a latent cache (16-channel latents, T5 + CLIP with pooled) trains like the images; exact resume;
`ncppo sample` with a LoRA and on a pipeline saved without T5."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ncppo.lora import adapters_disabled
from ncppo.spaces import NCPConfig
from ncppo.train.config import TrainConfig
from ncppo.train.loop import train
from ncppo.train.step import Reference, preference_step
from test_objective_direction import fresh_lora

pytestmark = pytest.mark.usefixtures("single_thread")

FIXTURES = {"sd3": "tiny_sd3_path", "flux": "tiny_flux_path"}
BETA = {"latent": 50.0, "ncp": 1e6}  # flow latent errors ~1.4, tiny-DiT NCP errors ~1e-7


def make_config(model, data, out, **overrides) -> TrainConfig:
    values = dict(model=str(model), data=str(data), output_dir=str(out), resolution=32, batch_size=2, lora_rank=4,
                  max_steps=2, learning_rate=1e-3, report_to="none", checkpoint_every=0, log_every=1, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


# ---------------------------------------------------------------- the direction of each objective


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def adapter(request):
    from ncppo.models import load_model

    adapter = load_model(str(request.getfixturevalue(FIXTURES[request.param])))
    adapter.fixed_cond = adapter.encode_prompts(["a red circle", "a blue square", "a cat"])
    return adapter


def run(adapter, net, objective, space):
    g = torch.Generator().manual_seed(1)
    batch = dict(latents=torch.randn(3, 2, 16, 8, 8, generator=g), captions=["a red circle", "a blue square", "a cat"],
                 conditioning=adapter.fixed_cond, original_sizes=torch.full((3, 2, 2), 16),
                 crops_top_left=torch.zeros(3, 2, 2, dtype=torch.long))
    return preference_step(adapter, net, Reference(net, lambda: adapters_disabled(net)), batch, objective=objective,
                           space=space, beta=BETA[space], cpo_lambda=0.5, orpo_lambda=0.1, ncp=NCPConfig(),
                           generator=torch.Generator().manual_seed(0), resolution=16)


@pytest.mark.parametrize("space", ["latent", "ncp"])
@pytest.mark.parametrize("objective", ["dpo", "hinge", "ipo", "cpo", "sft", "orpo"])
def test_training_moves_errors_the_way_the_objective_says(adapter, objective, space):
    """One normalised gradient step on a fixed batch (noise, sigmas, text): reference objectives raise
    h = (ref_w - ref_l) - (pol_w - pol_l), CPO lowers pol_w - pol_l, SFT and ORPO lower pol_w."""
    net = fresh_lora(adapter)
    params = [p for p in net.parameters() if p.requires_grad]
    assert any("add_q_proj" in n for n, p in net.named_parameters() if p.requires_grad)  # joint/context projections
    with torch.no_grad():
        before = run(adapter, net, objective, space).metrics
    grads = torch.autograd.grad(run(adapter, net, objective, space).loss, params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 1e-2 * g / norm
        after = run(adapter, net, objective, space).metrics
    m0, m1 = ({k: v.item() for k, v in m.items()} for m in (before, after))
    if objective in ("dpo", "hinge", "ipo"):
        assert (m1["ref_err_w"], m1["ref_err_l"]) == (m0["ref_err_w"], m0["ref_err_l"])  # the reference is frozen
        h0 = (m0["ref_err_w"] - m0["ref_err_l"]) - (m0["policy_err_w"] - m0["policy_err_l"])
        h1 = (m1["ref_err_w"] - m1["ref_err_l"]) - (m1["policy_err_w"] - m1["policy_err_l"])
        assert h0 == 0.0 and h1 > 0, (h0, h1)  # LoRA starts at zero: policy == reference, bit for bit
    elif objective == "cpo":
        assert m1["policy_err_w"] - m1["policy_err_l"] < m0["policy_err_w"] - m0["policy_err_l"]
    else:
        assert m1["policy_err_w"] < m0["policy_err_w"]


# ---------------------------------------------------------------- the training command


def _draw(pipe, family):
    g = torch.Generator().manual_seed(0)
    kwargs = dict(guidance_scale=3.5) if family == "flux" else dict(guidance_scale=1.0)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=g, output_type="np",
                **kwargs).images


@pytest.mark.parametrize("family,space", [("sd3", "ncp"), ("flux", "latent")])
def test_saved_lora_loads_into_the_stock_pipeline_and_changes_its_output(family, space, request, pairs_parquet,
                                                                          tmp_path):
    from diffusers import DiffusionPipeline

    path = request.getfixturevalue(FIXTURES[family])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\n")  # the toy-judge scorer's grammar
    result = train(make_config(path, pairs_parquet, tmp_path / "run", space=space, beta=BETA[space],
                               learning_rate=5e-2, validation_prompts=["a red circle"], validation_every=2,
                               eval_every=2, eval_prompts=str(prompts), eval_scorer="toy-judge", sample_steps=2))
    assert result.steps == 2 and result.weights_path.name == "pytorch_lora_weights.safetensors"
    # the validation and eval hooks drew through the same adapter
    assert [p.name for p in (tmp_path / "run" / "validation").glob("*.png")] == ["step-0000002.png"]
    assert [h["step"] for h in result.eval_history] == [0, 2] and "win_rate_vs_step0" in result.eval_history[1]
    keys = load_file(result.weights_path).keys()
    assert all(k.startswith("transformer.") for k in keys)
    assert any(".attn.add_q_proj.lora_A" in k for k in keys) and any(".attn.to_add_out.lora_B" in k for k in keys)
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    pipe.set_progress_bar_config(disable=True)
    before = _draw(pipe, family)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft warns when file keys and adapter modules disagree
        pipe.load_lora_weights(str(tmp_path / "run"), adapter_name="tuned")
    # every trained LoRA weight reached the stock transformer, with its value
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="tuned")
    saved = load_file(result.weights_path)
    assert len(loaded) == len(saved)
    for k, v in saved.items():
        torch.testing.assert_close(loaded[k.removeprefix("transformer.")], v, msg=k)
    assert abs(_draw(pipe, family) - before).max() > 1e-3
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["timestep_sampling"] == "auto" and manifest["steps"] == 2


def test_full_finetune_of_a_transformer_saves_it_and_sample_loads_it(tiny_sd3_no_t5_path, pairs_parquet, tmp_path):
    """Also: a pipeline saved with text_encoder_3=None trains and samples (T5 zeros, as the pipeline does)."""
    from diffusers import SD3Transformer2DModel

    from ncppo.evaluate.sample import load_pipeline

    result = train(make_config(tiny_sd3_no_t5_path, pairs_parquet, tmp_path / "full", finetune="full", max_steps=1,
                               space="ncp", beta=1e6, ncp_blocks=1))
    assert result.weights_path == tmp_path / "full" / "transformer"
    card = (tmp_path / "full" / "README.md").read_text()  # the model card of a DiT full fine-tune
    assert card.startswith("---\nlibrary_name: diffusers") and "- ncppo" in card
    tuned = SD3Transformer2DModel.from_pretrained(result.weights_path)
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_no_t5_path, subfolder="transformer")
    assert max((a - b).abs().max().item() for a, b in zip(tuned.parameters(), base.parameters())) > 0
    pipe = load_pipeline(str(tiny_sd3_no_t5_path), unet=str(tmp_path / "full"))
    assert pipe.text_encoder_3 is None
    torch.testing.assert_close(pipe.transformer.pos_embed.proj.weight, tuned.pos_embed.proj.weight)


def test_cache_with_text_embeddings_trains_like_the_images_and_resumes_exactly(tiny_flux_path, pairs_parquet, tmp_path):
    from ncppo.data.cache import cache_latents

    info = cache_latents(pairs_parquet, str(tiny_flux_path), tmp_path / "cache", resolution=32, text_embeddings=True,
                         progress=False)
    assert info["family"] == "flux" and info["latent_shape"] == [16, 16, 16]
    shard = load_file(next((tmp_path / "cache").glob("shard-*.safetensors")))
    assert shard["encoder_hidden_states"].shape[1:] == (512, 32) and shard["pooled_prompt_embeds"].shape[1:] == (16,)

    common = dict(space="ncp", beta=1e6, max_steps=2, batch_size=1, gradient_accumulation_steps=2)
    from_images = train(make_config(tiny_flux_path, pairs_parquet, tmp_path / "images", **common))
    full = load_file(train(make_config(tiny_flux_path, tmp_path / "cache", tmp_path / "cached", **common)).weights_path)
    for k, v in load_file(from_images.weights_path).items():
        torch.testing.assert_close(full[k], v, rtol=1e-4, atol=1e-6, msg=k)

    cut = make_config(tiny_flux_path, tmp_path / "cache", tmp_path / "cut", checkpoint_every=1, **common)
    cut.max_steps = 1
    train(cut)
    cut.max_steps, cut.resume = 2, "latest"
    resumed = load_file(train(cut).weights_path)
    assert resumed.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)


def test_sample_command_with_a_lora_on_sd3(tiny_sd3_path, pairs_parquet, tmp_path):
    from ncppo.evaluate.sample import SampleConfig, read_index, run_sample

    run = train(make_config(tiny_sd3_path, pairs_parquet, tmp_path / "run", space="latent", beta=50.0, max_steps=1,
                            learning_rate=5e-2))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na cat\n")
    out = {}
    for name, lora in (("base", None), ("tuned", str(run.weights_path))):
        run_sample(SampleConfig(model=str(tiny_sd3_path), prompts=str(prompts), out=str(tmp_path / name), lora=lora,
                                steps=2, guidance=1.0, height=32, width=32, device="cpu"))
        out[name] = read_index(tmp_path / name)
    assert len(out["base"]) == len(out["tuned"]) == 2
    from PIL import Image
    import numpy as np

    a = np.asarray(Image.open(tmp_path / "base" / out["base"][0]["file"]), dtype=np.float32)
    b = np.asarray(Image.open(tmp_path / "tuned" / out["tuned"][0]["file"]), dtype=np.float32)
    assert np.abs(a - b).max() > 0


@pytest.mark.parametrize("family", sorted(FIXTURES))
def test_the_flow_library_snippet_runs(family, request):
    """docs/library.md's SD3/FLUX step, executed on the tiny pipelines."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "library.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", text, re.S)[1]
    assert "adapter.perception" in snippet
    g = torch.Generator().manual_seed(0)
    scope = dict(model=str(request.getfixturevalue(FIXTURES[family])), dtype=torch.float32, device="cpu", B=2,
                 captions=["a red circle", "a cat"], x0=torch.randn(4, 16, 16, 16, generator=g), gen=g,
                 noise=torch.randn(2, 16, 16, 16, generator=g).repeat(2, 1, 1, 1))
    exec(snippet, scope)
    assert scope["out"].loss.item() == pytest.approx(0.6931471805599453, abs=1e-6)  # LoRA at init: policy == reference
    scope["out"].loss.backward()
    assert (scope["pol_err"] > 0).all()


@pytest.mark.slow
def test_two_processes_train_flux_ncp(tiny_flux_path, pairs_parquet, tmp_path):
    """torchrun + accelerate on CPUs (gloo), as `accelerate launch` runs it: metrics are the mean over ranks."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ncppo",
           "train", "--model", str(tiny_flux_path), "--data", str(pairs_parquet), "--output-dir", str(out),
           "--resolution", "32", "--batch-size", "1", "--lora-rank", "4", "--max-steps", "2", "--report-to", "none",
           "--checkpoint-every", "0", "--log-every", "1", "--space", "ncp", "--beta", "1000000",
           "--log-rank-metrics", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, rank0, rank1 = ([json.loads(line) for line in (out / name).read_text().splitlines()]
                            for name in ("metrics.jsonl", "metrics_rank0.jsonl", "metrics_rank1.jsonl"))
    assert rank0[0]["ref_err_w"] != rank1[0]["ref_err_w"]  # each rank saw its own pairs
    for m, a, b in zip(merged, rank0, rank1):
        for key in ("loss", "policy_err_w", "ref_err_l"):
            assert m[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-6, abs=1e-15), key
    assert json.loads((out / "manifest.json").read_text())["processes"] == 2
    assert load_file(out / "pytorch_lora_weights.safetensors")
