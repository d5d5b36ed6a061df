"""Throughput of `ncppo data generate`, the cost of on-policy rounds: sampling vs scoring.

Prints images/s of sampling and of each scorer (pipeline and scorers loaded once, a warm-up batch
not timed), the scoring share of generate time, and seconds per pair of one end-to-end
`run_generate` (best-worst: one pair per prompt, so K images per pair), read from its manifest.

    python benchmarks/generate_speed.py --out /tmp/gen-bench           # GPU: SD1.5 architecture, 512 px, bf16,
                                                                        # batch 16, PickScore-architecture (ViT-H/14)
    python benchmarks/generate_speed.py --small --out /tmp/gen-small   # CPU: the toy base, 32 px, toy-judge and a
                                                                        # tiny random CLIP through the PickScore path

Weights are random (nothing is downloaded): throughput does not depend on them. The GPU goal
(issue 18): PickScore scoring takes at most 10% of generate time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def clip_folder(folder: Path, small: bool) -> Path:
    """A CLIPModel with PickScore's architecture (ViT-H/14 vision, 1024-wide text; random weights),
    or a tiny one, saved with a tokenizer and a PIL image processor like a hub folder."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from ncppo.tiny import build_tokenizer

    tok = build_tokenizer(model_max_length=16 if small else 77)
    if small:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=16)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
        size, projection = 32, 16
    else:  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the architecture of yuvalkirstain/PickScore_v1
        text = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    max_position_embeddings=77, hidden_act="gelu")
        vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act="gelu")
        size, projection = 224, 1024
    config = CLIPConfig(text_config=dict(vocab_size=max(len(tok), 1000), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                         **text),
                        vision_config=vision, projection_dim=projection)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="work folder: models, samples, results.json")
    parser.add_argument("--small", action="store_true", help="CPU: the toy base at 32 px")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (default 16; --small 24)")
    parser.add_argument("--per-prompt", type=int, default=4, help="candidates K per prompt")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default 30; --small 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default 16; --small 32)")
    args = parser.parse_args(argv)

    from ncppo.data.generate import GenerateConfig, run_generate
    from ncppo.evaluate.sample import load_pipeline, sample_images
    from ncppo.evaluate.scorers import get_scorer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small = args.small
    device = "cpu" if small or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if small else torch.bfloat16
    steps = args.steps or (20 if small else 30)
    batch = args.batch_size or (32 if small else 16)
    n_prompts = args.prompts or (24 if small else 16)
    res = 32 if small else 512
    if small:
        from ncppo.toy import world
        from ncppo.toy.base import SHIPPED_BASE

        model, prompts = str(SHIPPED_BASE), world.prompts("train")[:n_prompts]
    else:
        from gpu_train import build_pipeline

        model = str(out / "sd15-arch") if (out / "sd15-arch" / "model_index.json").is_file() else str(
            build_pipeline(out / "sd15-arch", small=False))
        prompts = [f"a photo of a {c} {t} on a {b} background" for c in ("red", "blue", "green", "yellow")
                   for t in ("cat", "dog") for b in ("white", "dark")][:n_prompts]
    clip = out / "clip"
    if not (clip / "config.json").is_file():
        clip_folder(clip, small)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")

    # 1. Sampling and scoring throughput, each loaded once, a warm-up batch first.
    pipe = load_pipeline(model, dtype=dtype, device=device)
    scorers = {"pickscore (architecture)": get_scorer("pickscore", str(clip), device=device, dtype=dtype)}
    if small:
        scorers["toy-judge"] = get_scorer("toy-judge")
    todo = [p for p in prompts for _ in range(args.per_prompt)]
    seeds = list(range(len(todo)))
    sample_images(pipe, todo[:batch], seeds[:batch], steps=steps, guidance=7.5, height=res, width=res,
                  batch_size=batch, progress=False)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    images = sample_images(pipe, todo, seeds, steps=steps, guidance=7.5, height=res, width=res, batch_size=batch,
                           progress=False)
    sync()
    sampling = len(images) / (time.perf_counter() - t)
    rows = {"sampling": {"images_per_s": sampling}}
    for name, scorer in scorers.items():
        scorer.score(images[:batch], todo[:batch])
        sync()
        t = time.perf_counter()
        for start in range(0, len(images), batch):
            scorer.score(images[start:start + batch], todo[start:start + batch])
        sync()
        rate = len(images) / (time.perf_counter() - t)
        rows[name] = {"images_per_s": rate, "share_of_generate": (1 / rate) / (1 / rate + 1 / sampling)}
    del pipe

    # 2. One end-to-end `data generate` (best-worst: one pair per prompt), timings from its manifest.
    gen = out / "generate"
    run_generate(GenerateConfig(model=model, prompts=str(out / "prompts.txt"), out=str(gen), per_prompt=args.per_prompt,
                                steps=steps, guidance=7.5, height=res, width=res, batch_size=batch,
                                dtype="float32" if small else "bfloat16", scorer=["pickscore"], scorer_path=[str(clip)],
                                score_batch_size=batch, min_margin=0.0), progress=False)
    timings = json.loads((gen / "manifest.json").read_text())["timings"]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "resolution": res, "steps": steps,
              "batch_size": batch, "dtype": str(dtype), "images": len(images), "per_prompt": args.per_prompt,
              "throughput": rows, "generate_manifest_timings": timings,
              "versions": {"torch": torch.__version__}}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']}, {res} px, {steps} steps, batch {batch}, {dtype}, {len(images)} images")
    print("| stage | images/s | share of generate time |\n|---|---|---|")
    for name, row in rows.items():
        share = f"{100 * row['share_of_generate']:.1f}%" if "share_of_generate" in row else "-"
        print(f"| {name} | {row['images_per_s']:.2f} | {share} |")
    print(f"end to end (data generate, loading included): sampling {timings['sampling_s']:.1f} s, scoring "
          f"{timings['scoring_s']:.1f} s, {timings['s_per_pair']:.2f} s per pair (K = {args.per_prompt})")
    return result


if __name__ == "__main__":
    main()
