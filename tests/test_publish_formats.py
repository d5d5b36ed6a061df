"""`ncppo export`: kohya and diffusers LoRA files and merged pipelines, checked with numbers on the
tiny real SD and SDXL pipelines. The LoRA has alpha 12 != rank 4 and up-weights drawn large, so
the adapter moves the U-Net output by ~0.8 and a wrong alpha / rank scale cannot pass."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ncppo.cli import main
from ncppo.errors import InputError
from ncppo.manifest import write_manifest
from ncppo.models import FAMILIES, SDAdapter, load_model
from ncppo.publish.export import ExportConfig, check_format, run_export
from ncppo.publish.run import load_run
from ncppo.train.checkpoint import LORA_FILE, STATE_FILE, run_identity
from ncppo.train.config import TrainConfig

RANK, ALPHA = 4, 12.0
TOL = 1e-4


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def run(request, tmp_path_factory):
    """A LoRA run folder as `ncppo train` leaves it: the final diffusers file (saved by the
    adapter's save_lora), manifest.json, and checkpoint-7/ (peft keys + trainer state)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family = request.param
    model = request.getfixturevalue(f"tiny_{family}_path")
    out = tmp_path_factory.mktemp(f"run-{family}") / "run"
    adapter = load_model(str(model))
    unet = adapter.unet
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=g)
    adapter.save_lora(unet, out)
    config = TrainConfig(model=str(model), data="pairs", output_dir=str(out), lora_rank=RANK, lora_alpha=ALPHA,
                         resolution=32)
    write_manifest(out / "manifest.json", command="train", config=config, steps=7, processes=1,
                   data={"source": "pairs", "pairs": 6, "fingerprint": "f1ng3rpr1nt"})
    ckpt = out / "checkpoint-7"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, ckpt / LORA_FILE)
    identity = run_identity(config, processes=1, data_fingerprint="f1ng3rpr1nt", pairs=6)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 7, "run": identity}))
    return SimpleNamespace(family=family, model=str(model), dir=out, checkpoint=ckpt, unet=unet)


def unet_output(unet, family):
    g = torch.Generator().manual_seed(1)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=states, added_cond_kwargs=added).sample


def images(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=16, width=16, generator=g, output_type="np").images


def pipeline(path, **kwargs):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_lora(model, file):
    pipe = pipeline(model)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    return pipe


def test_kohya_and_diffusers_exports_act_like_the_trained_lora(run, tmp_path):
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = tmp_path / "kohya.safetensors"
    plain = tmp_path / "plain.safetensors"
    run_export(ExportConfig(run=str(run.checkpoint), format="kohya", out=str(kohya)))
    run_export(ExportConfig(run=str(run.checkpoint), format="diffusers", out=str(plain)))

    from ncppo.lora import adapters_disabled

    trained = with_lora(run.model, run.dir / "pytorch_lora_weights.safetensors")  # the training output
    ref, ref_images = unet_output(trained.unet, run.family), images(trained)
    with adapters_disabled(run.unet):
        assert (ref - unet_output(run.unet, run.family)).abs().max() > 0.1  # the LoRA matters
    assert (ref - unet_output(run.unet, run.family)).abs().max() <= TOL  # the file is the trained U-Net
    for file in (plain, kohya):
        pipe = with_lora(run.model, file)
        assert (unet_output(pipe.unet, run.family) - ref).abs().max() <= TOL, file.name
    assert abs(images(pipe) - ref_images).max() <= TOL  # the kohya file's images, too

    # diffusers' own converter writes alpha = rank: that file is 3x too weak here.
    stock = tmp_path / "stock.safetensors"
    save_file(convert_state_dict_to_kohya({f"unet.{k}": v for k, v in load_file(run.checkpoint / LORA_FILE).items()}),
              stock)
    assert (unet_output(with_lora(run.model, stock).unet, run.family) - ref).abs().max() > 0.1

    with safe_open(str(plain), framework="pt") as fh:
        stored = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert stored["unet.r"] == RANK and stored["unet.lora_alpha"] == ALPHA


def test_kohya_keys_follow_the_naming_rule_and_carry_metadata(run, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft.tuners.lora import LoraLayer

    out = tmp_path / "lora.safetensors"
    assert main(["export", str(run.dir), "--format", "kohya", "--out", str(out), "--dtype", "fp16"]) == 0
    # kohya's rule: "lora_unet_" + the U-Net module path with "." -> "_" (what sd-scripts writes for
    # diffusers-named U-Nets, and what ComfyUI maps from the diffusers names of the base weights).
    adapted = [name for name, m in run.unet.named_modules() if isinstance(m, LoraLayer)]
    names = {"lora_unet_" + name.replace(".", "_") for name in adapted}
    base = UNet2DConditionModel.from_pretrained(run.model, subfolder="unet")
    base_names = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in base.state_dict() if k.endswith(".weight")}
    assert len(adapted) == len(names) > 0 and names <= base_names
    with safe_open(str(out), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in keys}
    assert keys == {n + s for n in names for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    for name in names:
        down, up, alpha = (tensors[name + s] for s in (".lora_down.weight", ".lora_up.weight", ".alpha"))
        assert down.shape[0] == RANK and up.shape[1] == RANK and down.dtype == up.dtype == torch.float16
        assert alpha.shape == () and alpha.item() == ALPHA
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    assert meta["ss_base_model_version"] == {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}[run.family]
    assert {k: meta[f"ncppo.{k}"] for k in ("objective", "space", "beta", "steps", "data_fingerprint")} == {
        "objective": "dpo", "space": "ncp", "beta": "2500.0", "steps": "7", "data_fingerprint": "f1ng3rpr1nt"}


def test_merged_pipeline_gives_base_plus_lora_images(run, tmp_path):
    out = tmp_path / "merged"
    run_export(ExportConfig(run=str(run.dir), format="merged", out=str(out), card=True))
    assert not list(out.rglob("*.bin")) and list(out.glob("unet/*.safetensors"))
    assert "pipeline" in (out / "README.md").read_text()
    merged = pipeline(out)
    trained = with_lora(run.model, run.dir / "pytorch_lora_weights.safetensors")
    assert (unet_output(merged.unet, run.family) - unet_output(trained.unet, run.family)).abs().max() <= TOL
    assert abs(images(merged) - images(trained)).max() <= TOL
    assert not any("lora" in name for name, _ in merged.unet.named_modules())  # fused, not a LoRA wrapper

    if run.family == "sd":  # --dtype fp16: half the bytes, same network up to fp16 rounding
        half = tmp_path / "merged-fp16"
        run_export(ExportConfig(run=str(run.dir), format="merged", out=str(half), dtype="fp16"))
        with safe_open(str(next(half.glob("unet/*.safetensors"))), framework="pt") as fh:
            assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}
        from diffusers import UNet2DConditionModel

        reloaded = UNet2DConditionModel.from_pretrained(half, subfolder="unet").state_dict()
        fused = merged.unet.state_dict()  # fp16 export = the fp32 merge rounded once
        assert reloaded.keys() == fused.keys() and all(torch.equal(reloaded[k], fused[k].half()) for k in fused)


@pytest.mark.parametrize("run", ["sd"], indirect=True)  # family-independent
def test_refusals_are_one_line_and_a_bare_checkpoint_exports_with_its_alpha(run, tmp_path, capsys):
    # A family whose adapter does not declare kohya (e.g. a DiT) is refused before any work.
    class NoKohya(SDAdapter):
        family = "dit"
        export_formats = ("diffusers", "merged")

    loaded = load_run(run.dir)
    FAMILIES["dit"] = NoKohya
    try:
        loaded.family = "dit"
        with pytest.raises(InputError, match="not available for the dit family .it exports diffusers, merged"):
            check_format(loaded, "kohya")
    finally:
        del FAMILIES["dit"]

    # The checkpoint of a run that never wrote manifest.json: model and the trained alpha come from the
    # run identity in its trainer state.
    bare = tmp_path / "bare" / "checkpoint-7"
    shutil.copytree(run.checkpoint, bare)
    out = tmp_path / "bare.safetensors"
    args = ["export", str(bare), "--format", "kohya", "--out", str(out)]
    assert main(args) == 0
    full = tmp_path / "full.safetensors"
    run_export(ExportConfig(run=str(run.checkpoint), format="kohya", out=str(full)))
    a, b = load_file(out), load_file(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # no silent overwrite

    # A full fine-tune: no LoRA file to write, but a merged pipeline with its U-Net.
    from diffusers import UNet2DConditionModel

    ft = tmp_path / "full-run"
    unet = UNet2DConditionModel.from_pretrained(run.model, subfolder="unet")
    with torch.no_grad():
        unet.conv_in.bias += 1.0
    unet.save_pretrained(ft / "unet")
    write_manifest(ft / "manifest.json", command="train", config=TrainConfig(model=run.model, data="pairs",
                   output_dir=str(ft), finetune="full"), steps=3)
    assert main(["export", str(ft), "--format", "kohya", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "full fine-tune" in capsys.readouterr().err
    assert main(["export", str(ft), "--format", "merged", "--out", str(tmp_path / "ft-merged")]) == 0
    merged = pipeline(tmp_path / "ft-merged").unet
    assert (unet_output(merged, "sd") - unet_output(unet, "sd")).abs().max() == 0


# The public U-Net configs (unet/config.json) of Stable Diffusion 1.5 and SDXL base 1.0.
SD15_UNET = dict(sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize("pipeline_class, unet_config", [("StableDiffusionPipeline", SD15_UNET),
                                                          ("StableDiffusionXLPipeline", SDXL_UNET)], ids=["sd15", "sdxl"])
def test_kohya_names_map_back_to_every_module_at_full_scale(pipeline_class, unet_config):
    """The real SD1.5 / SDXL U-Net layouts (on the meta device: names only, no weights): diffusers'
    kohya reader, as `load_lora_weights` runs it, maps every exported key back to its module."""
    import diffusers
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ncppo.publish.kohya import to_kohya

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    peft = get_peft_model_state_dict(unet)
    state, alphas = getattr(diffusers, pipeline_class).lora_state_dict(to_kohya(peft, ALPHA), unet_config=unet.config)
    assert set(convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})) == set(peft)
    assert len(alphas) == len(peft) // 2 and set(alphas.values()) == {ALPHA}


def test_flow_family_exports_its_formats_and_refuses_kohya(tiny_sd3_path, tmp_path, capsys):
    """SD3 (a DiT): the adapter declares diffusers and merged; both give base + LoRA's images."""
    from peft import LoraConfig

    adapter = load_model(str(tiny_sd3_path))
    adapter.denoiser.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    for name, p in adapter.denoiser.named_parameters():
        if "lora_B" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=g)
    out = tmp_path / "run"
    adapter.save_lora(adapter.denoiser, out)
    write_manifest(out / "manifest.json", command="train", steps=3,
                   config=TrainConfig(model=str(tiny_sd3_path), data="pairs", output_dir=str(out), lora_rank=RANK))
    assert main(["export", str(out), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    assert "not available for the sd3 family (it exports diffusers, merged)" in capsys.readouterr().err
    plain, merged = tmp_path / "plain.safetensors", tmp_path / "merged"
    run_export(ExportConfig(run=str(out), format="diffusers", out=str(plain)))
    run_export(ExportConfig(run=str(out), format="merged", out=str(merged)))

    def draw(pipe):
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    reference = draw(with_lora(tiny_sd3_path, out / "pytorch_lora_weights.safetensors"))
    assert abs(reference - draw(pipeline(tiny_sd3_path))).max() > 1e-2  # the LoRA matters (measured: 0.07)
    for pipe in (with_lora(tiny_sd3_path, plain), pipeline(merged)):
        assert abs(draw(pipe) - reference).max() <= TOL


@pytest.mark.parametrize("run", ["sd"], indirect=True)  # one family is enough
def test_merged_export_of_a_base_that_cannot_be_loaded_is_one_line(run, tmp_path, capsys):
    broken = tmp_path / "broken-base"
    shutil.copytree(run.model, broken)
    for f in (broken / "unet").iterdir():
        if f.name != "config.json":
            f.unlink()
    args = ["export", str(run.dir), "--format", "merged", "--model", str(broken)]
    assert main(args + ["--out", str(tmp_path / "m1")]) == 2
    assert capsys.readouterr().err.strip() == (f"ncppo export: error: base model {broken}: partial pipeline folder: "
                                               "unet/ has no weights file")
    shutil.rmtree(broken)
    shutil.copytree(run.model, broken)
    (broken / "unet" / "config.json").write_text("{not json")
    assert main(args + ["--out", str(tmp_path / "m2")]) == 2
    full = capsys.readouterr().err
    err = full.splitlines()[-1]  # after diffusers' progress bar
    assert err.startswith(f"ncppo export: error: base model {broken}: cannot load the pipeline (") and "JSON" in err
    assert "Traceback" not in full and not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
