"""The model card: a `README.md` in the Hugging Face Hub's format, written from a run's manifest.

YAML front matter (base_model, library_name, pipeline_tag, license, tags, widget) and a body:
the method (space, objective, beta in ncppo's and the official convention), the data (source,
pairs, curation, fingerprint), steps, batch and precision, the final validation images, the eval
table from `ncppo compare` output, how to load the weights, limitations, and the run's config.
Every training output gets one (`write_training_card`); `ncppo export --card` writes one beside
an exported file or pipeline, optionally with `--eval`.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError, MissingInputError, OutputExistsError
from ..objectives import BETA_CONVENTIONS, NEEDS_REFERENCE, method_name
from .run import WEIGHTS_FILE, TrainedRun, load_run

# The card's last line; a README.md without it was written by someone else and is never overwritten.
MARKER = "<!-- written by ncppo (`ncppo export --card` rewrites this file) -->"
PAPER = "https://arxiv.org/abs/2406.17636"
OBJECTIVES = {"dpo": "DPO", "cpo": "CPO", "sft": "SFT (winners only)", "ipo": "IPO", "hinge": "hinge (SLiC)",
              "orpo": "ORPO"}
SPACES = {
    "latent": "latent space: the per-sample noise-prediction error of Diffusion-DPO (Wallace et al. 2023)",
    "ncp": "noise-conditioned perceptual (NCP) space: the error is measured between features of the frozen "
           "base network's own encoder (a U-Net's down blocks, a DiT's first blocks; Gambashidze et al., "
           f"[arXiv 2406.17636]({PAPER}))",
}
WIDGET_DIR = "images"


# ----- the card -------------------------------------------------------------------------------

def render_card(run: TrainedRun, *, kind: str = "lora", weights_name: str | None = None, license: str | None = None,
                widget: list[tuple[str, str]] = (), evals: list[dict] = ()) -> str:
    """The card's text. `kind`: "lora" (a diffusers LoRA file), "kohya" (a kohya file) or "merged"
    (a whole pipeline); `widget`: (prompt, image path relative to the card); `evals`: compare.json
    contents from `ncppo compare`."""
    sections = [_title(run, kind), _method(run), _data(run), _training(run), _images(widget),
                _evaluation(run, evals), _usage(run, kind, weights_name), _limitations(run, kind),
                _config(run)]
    body = "\n\n".join(s for s in sections if s)
    meta = yaml.safe_dump(_front_matter(run, kind, license, widget), sort_keys=False, allow_unicode=True)
    return f"---\n{meta}---\n\n{body}\n\n{MARKER}\n"


def write_model_card(run: TrainedRun, card_dir: str | Path, *, kind: str = "lora", weights_name: str | None = None,
                     license: str | None = None, eval_paths: list[str] = ()) -> Path:
    """Write `card_dir/README.md` (and the widget images under `card_dir/images/`).

    Refuses to overwrite a README.md that ncppo did not write."""
    from ..manifest import atomic_write_text

    card_dir = Path(card_dir)
    path = check_card_target(card_dir)
    evals = [read_compare(p) for p in eval_paths]
    widget = widget_images(run, card_dir)
    text = render_card(run, kind=kind, weights_name=weights_name, license=license, widget=widget, evals=evals)
    return atomic_write_text(path, text)


def check_card_target(card_dir: str | Path) -> Path:
    """`card_dir/README.md`, unless a README.md that ncppo did not write is there."""
    path = Path(card_dir) / "README.md"
    if path.is_file() and MARKER not in path.read_text(errors="replace"):
        raise OutputExistsError(f"{path} exists and was not written by ncppo; move it or pick another --out")
    return path


def write_training_card(output_dir: str | Path, family: str | None = None) -> Path | None:
    """The card of a finished training run, beside its weights. Never fails the run: a problem
    becomes a warning (the weights and manifest are already saved)."""
    try:
        run = load_run(output_dir, family=family)
        return write_model_card(run, output_dir, kind="lora" if run.lora is not None else "full")
    except Exception as err:  # noqa: BLE001 - the card is a courtesy; the run's outputs are safe
        warnings.warn(f"{output_dir}: no model card written ({type(err).__name__}: {err}); "
                      f"run `ncppo export {output_dir} --card` to retry", stacklevel=2)
        return None


def read_compare(path: str | Path) -> dict:
    """compare.json from `ncppo compare --out DIR` (the file or its folder)."""
    path = Path(path)
    file = path / "compare.json" if path.is_dir() else path
    if not file.is_file():
        raise MissingInputError(f"--eval {path}: no compare.json (run `ncppo compare A B --out DIR` and pass DIR)")
    try:
        result = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--eval {file}: not valid JSON ({err})") from None
    if not isinstance(result.get("metrics"), dict):
        raise InputError(f"--eval {file}: not `ncppo compare` output (no 'metrics')")
    return result


def widget_images(run: TrainedRun, card_dir: Path) -> list[tuple[str, str]]:
    """Cut the run's last validation grid into one image per prompt under `card_dir/images/`.

    The grid is what `ValidationHook` saves: the prompts in order, min(4, n) columns."""
    prompts = list(run.config.get("validation_prompts") or [])
    grids = sorted((run.output_dir / "validation").glob("step-*.png"))
    if run.checkpoint and run.step is not None:  # a checkpoint shows the images of its own step, if any
        grids = [g for g in grids if g.stem == f"step-{run.step:07d}"]
    if not prompts or not grids:
        return []
    from PIL import Image

    grid = Image.open(grids[-1]).convert("RGB")
    columns = min(4, len(prompts))
    rows = math.ceil(len(prompts) / columns)
    w, h = grid.width // columns, grid.height // rows
    (card_dir / WIDGET_DIR).mkdir(parents=True, exist_ok=True)
    out = []
    for i, prompt in enumerate(prompts):
        r, c = divmod(i, columns)
        name = f"{WIDGET_DIR}/validation-{i}.png"
        grid.crop((c * w, r * h, (c + 1) * w, (r + 1) * h)).save(card_dir / name)
        out.append((prompt, name))
    return out


# ----- front matter ---------------------------------------------------------------------------

def _front_matter(run: TrainedRun, kind: str, license: str | None, widget) -> dict[str, Any]:
    c = run.config
    tags = ["text-to-image", "diffusers", *(["lora"] if kind in ("lora", "kohya") else []), "diffusers-training",
            *run.adapter_class.hub_tags, *([c["objective"]] if c.get("objective") else []),
            *(["ncp"] if c.get("space") == "ncp" else []), "ncppo"]
    meta: dict[str, Any] = {}
    hub_id = _hub_id(run.model)
    if hub_id:
        meta["base_model"] = hub_id
    meta.update({"library_name": "diffusers", "pipeline_tag": "text-to-image",
                 "license": license or base_license(run.model) or "other", "tags": list(dict.fromkeys(tags))})
    if widget:
        meta["widget"] = [{"text": prompt, "output": {"url": url}} for prompt, url in widget]
    return meta


def _hub_id(model: str) -> str | None:
    """`model` if it names a Hub repository (owner/name) rather than a local folder."""
    if Path(model).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return None
    return model


def base_license(model: str) -> str | None:
    """The `license:` of the base model's own card (a local folder, or the Hub cache), if any."""
    readme = Path(model) / "README.md"
    if not readme.is_file() and _hub_id(model):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "README.md")
            readme = Path(cached) if isinstance(cached, str) else readme
        except Exception:  # noqa: BLE001 - no cache, no license: the caller falls back
            return None
    if not readme.is_file():
        return None
    match = re.match(r"---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    return str(meta["license"]) if isinstance(meta, dict) and meta.get("license") else None


# ----- body sections --------------------------------------------------------------------------

def _method_name(run: TrainedRun) -> str:
    c = run.config
    if not c.get("objective"):
        return "preference"
    return method_name(c.get("space"), c["objective"])


def _denoiser(run: TrainedRun) -> str:
    return {"unet": "U-Net", "transformer": "transformer"}.get(run.adapter_class.lora_component, "denoiser")


def _title(run: TrainedRun, kind: str) -> str:
    what = {"merged": "pipeline", "full": f"fine-tuned {_denoiser(run)}",
            "kohya": "LoRA (kohya format)"}.get(kind, "LoRA")
    step = f" at step {run.step}" if run.checkpoint else ""
    return (f"# {run.output_dir.name}{step}: {_method_name(run)} {what} for {run.model}\n\n"
            f"Preference-aligned {run.family.upper()} weights trained with [ncppo](#method) "
            f"({run.config.get('finetune', 'lora')} fine-tuning of the {_denoiser(run)}; text encoders and VAE "
            "unchanged).")


def _method(run: TrainedRun) -> str:
    c = run.config
    if not c:
        return "## Method\n\nUnknown: the run left no manifest.json (the checkpoint of a run that did not finish)."
    lines = ["## Method", "",
             f"- Objective: {OBJECTIVES.get(c.get('objective'), c.get('objective'))} (`--objective {c.get('objective')}`), "
             f"in {SPACES.get(c.get('space'), c.get('space'))}."]
    if c.get("space") == "ncp":
        precision = f", precision `{c['ncp_precision']}`" if c.get("ncp_precision") else ""
        precision += f", first {c['ncp_blocks']} blocks" if c.get("ncp_blocks") else ""
        lines.append(f"- NCP settings: timestep mode `{c.get('timestep_mode')}`, encoder features "
                     f"`{c.get('ncp_layers')}`{precision}.")
    if c.get("objective") != "sft" and c.get("beta") is not None:
        beta, norm = float(c["beta"]), (run.manifest or {}).get("beta_normalization") or {}
        text = f"- beta = {beta:.6g} in ncppo's convention"
        if c.get("objective") in NEEDS_REFERENCE:
            text += ", `logits = beta * ((ref_w - ref_l) - (policy_w - policy_l))`"
        if norm.get("effective_beta"):
            text += (f", divided by the reference error scale {norm['error_scale']:.4g} measured at the start "
                     f"(`--beta-normalize`): effective beta {norm['effective_beta']:.6g}")
            beta = float(norm["effective_beta"])
        if c.get("objective") == "dpo":
            text += f"; the official Diffusion-DPO code would call this `beta_dpo = {beta / BETA_CONVENTIONS['diffusion-dpo']:.6g}`"
        lines.append(text + ". Raw betas are not comparable between the latent and the NCP space.")
    if c.get("objective") == "cpo" and c.get("cpo_lambda"):
        lines.append(f"- CPO winner-error weight lambda = {c['cpo_lambda']:g}.")
    if c.get("objective") == "orpo":
        lines.append(f"- ORPO odds-ratio weight = {c.get('orpo_lambda')}.")
    if run.lora is not None:
        lines.append(f"- LoRA rank {run.rank}, alpha {run.alpha:g} (scale alpha / rank = {run.alpha / run.rank:g}) "
                     f"on {', '.join(c.get('lora_targets') or sorted({_leaf(m) for m in run.modules}))} "
                     f"of the {_denoiser(run)} ({len(run.modules)} modules).")
    elif c.get("finetune") == "full":
        lines.append(f"- Full fine-tuning of every {_denoiser(run)} weight against a frozen copy of the base one.")
    return "\n".join(lines)


def _leaf(module: str) -> str:
    """The module's own name: `to_q`, or `to_out.0` for a numbered child."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _data(run: TrainedRun) -> str:
    d = run.data
    if not d:
        return ""
    lines = ["## Data", "", f"- Source: `{d.get('source')}` (split `{d.get('split', 'train')}`), "
                            f"{d.get('pairs')} preference pairs used."]
    curation = _curation(str(d.get("source") or ""))
    if curation:
        lines.append(f"- Curation: {curation}.")
    stats = d.get("stats") or {}
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items() if isinstance(v, (int, float)))
    if counts:
        lines.append(f"- Counts: {counts}.")
    skipped = ((run.manifest or {}).get("skipped_rows") or {}).get("count")
    if skipped:
        lines.append(f"- {skipped} unreadable rows were skipped during training (listed in manifest.json).")
    lines.append(f"- Fingerprint (captions and labels): `{d.get('fingerprint')}`.")
    return "\n".join(lines)


def _curation(source: str) -> str | None:
    """How the data folder was curated, from `ncppo data curate`'s stats.json (through a latent
    cache's cache_info.json when the run trained from one)."""
    folder = Path(source)
    for _ in range(2):
        info = _json(folder / "cache_info.json")
        if info and info.get("source"):
            folder = Path(str(info["source"]))
            continue
        stats = _json(folder / "stats.json")
        if stats and stats.get("rule"):
            pairs = f", {stats['pairs']} pairs" if stats.get("pairs") else ""
            return (f"`ncppo data curate --rule {stats['rule']}{pairs}`: kept {stats.get('rows_after')} of "
                    f"{stats.get('rows_before')} rows, {stats.get('prompts_after')} of {stats.get('prompts_before')} prompts")
        break
    return None


def _json(file: Path) -> dict | None:
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _training(run: TrainedRun) -> str:
    c, m = run.config, run.manifest or {}
    if not c:
        return f"## Training\n\n- Steps: {run.step}." if run.step is not None else ""
    processes = m.get("processes") or 1
    per_step = c.get("batch_size", 1) * c.get("gradient_accumulation_steps", 1) * processes
    lr = c.get("learning_rate")
    lr_text = f"{lr:g}" if isinstance(lr, (int, float)) else str(lr)
    if c.get("scale_lr") and isinstance(lr, (int, float)):
        lr_text += f" x {per_step} (--scale-lr) = {lr * per_step:g}"
    env = m.get("environment") or {}
    device = env.get("cuda") or "CPU"
    lines = ["## Training", "",
             f"- Steps: {run.step} of {c.get('max_steps')}"
             + (f" (stopped early: {m['stopped_early']})" if m.get("stopped_early") else "") + ".",
             f"- Batch: {per_step} pairs per optimizer step ({c.get('batch_size')} per process x "
             f"{c.get('gradient_accumulation_steps')} accumulation x {processes} processes)"
             + (f", at {c['resolution']} px." if c.get("resolution") else "."),
             f"- Optimizer {c.get('optimizer')}, learning rate {lr_text}, schedule {c.get('lr_scheduler')} "
             f"({c.get('lr_warmup_steps')} warmup steps), seed {c.get('seed')}.",
             f"- Precision: mixed precision `{c.get('mixed_precision')}`, gradient checkpointing "
             f"{'on' if c.get('gradient_checkpointing') else 'off'}; trainable weights in float32.",
             f"- Hardware: {processes} x {device}; ncppo {(env.get('packages') or {}).get('ncppo', '?')}, "
             f"diffusers {(env.get('packages') or {}).get('diffusers', '?')}."]
    final = m.get("final_metrics") or {}
    shown = {k: final[k] for k in ("loss", "implicit_acc", "reward_margin") if isinstance(final.get(k), (int, float))}
    if shown:
        lines.append("- Last logged step: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) + ".")
    if m.get("nonfinite_skipped"):
        lines.append(f"- {m['nonfinite_skipped']} micro-batches with non-finite loss or gradients were skipped.")
    return "\n".join(lines)


def _images(widget) -> str:
    if not widget:
        return ""
    cells = "\n".join(f"| ![{_escape(p)}]({url}) | {_escape(p)} |" for p, url in widget)
    return f"## Validation images\n\nThe run's last validation step (fixed seed).\n\n| image | prompt |\n|---|---|\n{cells}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _evaluation(run: TrainedRun, evals) -> str:
    from ..evaluate.report import markdown_table

    parts = []
    for result in evals:
        first = next(iter(result["metrics"].values()), {})
        parts.append(f"**{result.get('label_a', 'A')} vs {result.get('label_b', 'B')}**: {result.get('n_images')} images "
                     f"over {result.get('n_prompts')} prompts; win rates with {round(100 * first.get('confidence', 0.95))}% "
                     f"paired-bootstrap intervals (resampling {result.get('resampled', 'images')}), ties count half.\n\n"
                     + markdown_table(result["metrics"], result.get("label_a", "A"), result.get("label_b", "B")))
    history = [h for h in (run.manifest or {}).get("eval_history") or [] if "win_rate_vs_step0" in h]
    if history:
        rows = "\n".join(f"| {h['step']} | {h['mean_score']:.4g} | {100 * h['win_rate_vs_step0']:.1f}% "
                         f"[{100 * h['win_rate_ci'][0]:.1f}%, {100 * h['win_rate_ci'][1]:.1f}%] |" for h in history)
        parts.append(f"During training (`{run.config.get('eval_scorer')}` on `{run.config.get('eval_prompts')}`):\n\n"
                     f"| step | mean score | win rate vs step 0 [95% CI] |\n|---|---|---|\n{rows}")
    best = (run.manifest or {}).get("best")
    if best:
        gold = [h for h in (run.manifest or {}).get("eval_history") or [] if "gold_score" in h]
        rows = "\n".join(f"| {h['step']} | {h['gold_score']:.4g} | "
                         + (f"{h['mean_score']:.4g}" if "mean_score" in h else "-") + " |" for h in gold)
        which = ("these weights are that step's (`best/`): the run stopped when gold fell" if best.get("is_result")
                 else "its weights are in `best/`; the run's own weights are its last step's")
        parts.append(f"Gold guard (`{run.config.get('gold_scorer')}`, a scorer that did not label the training "
                     f"pairs, on `{run.config.get('eval_prompts')}`): best gold score {best['gold_score']:.4g} at step "
                     f"{best['step']}; {which}.\n\n| step | gold score | proxy score |\n|---|---|---|\n{rows}")
    if not parts:
        return ("## Evaluation\n\nNo evaluation is attached to this card. Evaluate with `ncppo sample`, `ncppo score` "
                "and `ncppo compare`, then `ncppo export RUN --card --eval COMPARE_DIR`.")
    return "## Evaluation\n\n" + "\n\n".join(parts)


def sampling_defaults(run: TrainedRun) -> tuple[int, float]:
    """(steps, guidance scale) for the card's snippet: the family's usual values, as its diffusers
    pipeline's defaults or the base model's own card (FLUX.1-dev 28 / 3.5, SD3 Medium 28 / 7.0,
    SD3.5 28 / 4.5 as in Stability's SD3.5 cards; SD/SDXL 50 / 7.5)."""
    if run.family == "flux":
        return 28, 3.5
    if run.family == "sd3":
        return (28, 4.5) if "3.5" in run.model or "3-5" in run.model else (28, 7.0)
    return 50, 7.5


def _usage(run: TrainedRun, kind: str, weights_name: str | None) -> str:
    base = run.model
    dtype = "bfloat16" if run.adapter_class.lora_component == "transformer" else "float16"  # FLUX/SD3 run in bf16
    head = "## How to use\n\n"
    from ..models.base import vae_subfolder

    # A run trained with --vae used that VAE (e.g. the fp16-fix SDXL VAE); a merged export holds it already.
    vae = run.config.get("vae") if kind != "merged" else None
    sub_arg = ', subfolder="vae"' if vae and vae_subfolder(vae) else ""
    vae_line = (f'vae = AutoencoderKL.from_pretrained("{vae}"{sub_arg}, torch_dtype=torch.{dtype})\n'
                if vae else "")
    vae_arg = ", vae=vae" if vae else ""
    pipe = f'{vae_line}pipe = DiffusionPipeline.from_pretrained("{base}"{vae_arg}, torch_dtype=torch.{dtype}).to("cuda")'
    if kind == "merged":
        code = ('pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER", '
                f'torch_dtype=torch.{dtype}).to("cuda")')
        text = "A whole pipeline with the trained weights merged in (no LoRA to load):"
    elif kind == "full":
        sub, cls = run.adapter_class.lora_component, run.adapter_class.denoiser_class_name
        code = (f'{sub} = {cls}.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER", subfolder="{sub}", '
                f'torch_dtype=torch.{dtype})\n{vae_line}pipe = DiffusionPipeline.from_pretrained("{base}", {sub}={sub}'
                f'{vae_arg}, torch_dtype=torch.{dtype}).to("cuda")')
        text = f"The fine-tuned {_denoiser(run)} ({cls}) in `{sub}/`, with the base pipeline's other components:"
    else:
        name = weights_name or WEIGHTS_FILE
        code = f'{pipe}\npipe.load_lora_weights("PATH_OR_REPO_OF_THIS_FOLDER", weight_name="{name}")'
        text = ("With diffusers (the kohya file loads through diffusers' kohya converter):" if kind == "kohya"
                else "With diffusers:")
    imports = "from diffusers import " + ("AutoencoderKL, " if vae else "") + "DiffusionPipeline" + (
        f", {run.adapter_class.denoiser_class_name}" if kind == "full" else "")
    steps, guidance = sampling_defaults(run)
    snippet = (f"```python\nimport torch\n{imports}\n\n{code}\n"
               f'image = pipe("a lighthouse at dusk", num_inference_steps={steps}, guidance_scale={guidance}).images[0]'
               "\n```")
    parts = [head + text + "\n\n" + snippet]
    if kind in ("lora", "kohya") and "kohya" in run.adapter_class.export_formats:
        get = ("" if kind == "kohya" else
               f"`ncppo export RUN --format kohya --out {run.output_dir.name}.safetensors` writes the LoRA in the "
               "kohya format (`lora_unet_*` keys with the trained alpha, `ss_*` metadata). ")
        parts.append(f"In A1111, Forge or ComfyUI: {get}Put the file in the UI's LoRA folder (`models/Lora`, or "
                     "`models/loras` for ComfyUI) and use it like any LoRA at strength 1.0 with the same base model.")
    elif kind == "merged":
        parts.append("The folder is in diffusers' layout; for A1111, Forge or ComfyUI export the LoRA instead "
                     "(`ncppo export RUN --format kohya`).")
    return "\n\n".join(parts)


def _limitations(run: TrainedRun, kind: str) -> str:
    m = run.manifest or {}
    lines = ["## Limitations", "",
             "- Preference alignment moves the model toward what the pair data's raters preferred; it inherits "
             "their biases and the base model's limitations, biases and license terms.",
             "- Reward-model scores and win rates are proxies for human preference; any figure quoted from the "
             "NCP paper is the paper's, not a measurement of these weights."]
    if run.checkpoint:
        lines.append(f"- An intermediate checkpoint (step {run.step} of {run.config.get('max_steps', '?')}).")
    if m.get("stopped_early"):
        lines.append(f"- The run stopped early: {m['stopped_early']}.")
    if kind in ("lora", "kohya") and "kohya" in run.adapter_class.export_formats:
        lines.append("- ncppo's tests check the kohya file through diffusers' kohya loader (same U-Net outputs and "
                     "images as the diffusers file) and its key names against kohya's naming rule; they do not run "
                     "A1111, Forge or ComfyUI themselves.")
    return "\n".join(lines)


def _config(run: TrainedRun) -> str:
    if not run.config:
        return ""
    text = yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True)
    return ("## Reproduce\n\n<details><summary>The run's resolved config (`ncppo train --config run.yaml`); "
            "manifest.json in the run folder also lists package versions</summary>\n\n"
            f"```yaml\n{text}```\n\n</details>")
