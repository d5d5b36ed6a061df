"""NCP precision in training: the same NCP-DPO run in exact fp32 and in bf16 with each precision method.

`ncppo train` on the toy world's trained base (shipped with ncppo) and its judge-labelled pairs, LoRA
DPO in NCP space, identical data order and random draws. The exact run is fp32 with
`--ncp-precision fp32`; the others use `--mixed-precision bf16` (frozen weights in bf16, autocast)
with `--ncp-precision scaled` (the default there), `fp32` (exact encoder passes) and `native` (the
encoder in bf16 as it comes). Printed per run, against the exact one: the median relative deviation
of the per-step policy errors and losses, and the relative distance and cosine of the final LoRA
update (B @ A summed over layers, i.e. the weight change it makes).

    python benchmarks/precision_training.py --steps 30        # CPU, minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

RUNS = {  # name: (mixed precision, ncp precision)
    "fp32 exact": ("no", "fp32"),
    "bf16 scaled": ("bf16", "scaled"),
    "bf16 fp32-encoder": ("bf16", "fp32"),
    "bf16 native": ("bf16", "native"),
}


def lora_delta(path: Path) -> torch.Tensor:
    """The weight change of every LoRA layer (up @ down), flattened and concatenated."""
    from safetensors.torch import load_file

    state = load_file(path)
    deltas = []
    for key in sorted(k for k in state if "lora_A" in k or "lora.down" in k):
        up = state[key.replace("lora_A", "lora_B").replace("lora.down", "lora.up")]
        deltas.append((up.double() @ state[key].double()).flatten())
    return torch.cat(deltas)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--beta", type=float, default=1e6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)

    from ncppo.toy.base import SHIPPED_BASE
    from ncppo.toy.data import DataConfig, build_pairs
    from ncppo.train.config import TrainConfig
    from ncppo.train.loop import train

    out = Path(args.out or tempfile.mkdtemp(prefix="ncppo-precision-"))
    data = build_pairs(DataConfig(out=str(out / "pairs"), pairs=args.pairs, seed=0))
    results = {}
    for name, (mixed, method) in RUNS.items():
        run = out / name.replace(" ", "-")
        result = train(TrainConfig(model=str(SHIPPED_BASE), data=str(data), output_dir=str(run), resolution=32,
                                   space="ncp", objective="dpo", beta=args.beta, learning_rate=args.lr,
                                   batch_size=args.batch_size, lora_rank=8, max_steps=args.steps, log_every=1,
                                   checkpoint_every=0, report_to="none", mixed_precision=mixed,
                                   ncp_precision=method, seed=0))
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        results[name] = dict(metrics=metrics, delta=lora_delta(result.weights_path))

    exact = results["fp32 exact"]
    print(f"\nNCP-DPO on the toy base, {args.steps} steps of {args.batch_size} pairs, beta {args.beta:g}, lr {args.lr:g}; "
          "against the fp32 run with exact encoder passes:\n")
    print("| run | policy error dev. (median over steps) | loss dev. | LoRA update rel. distance | cosine |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        def dev(key):
            return statistics.median(abs(m[key] - e[key]) / abs(e[key]) for m, e in zip(r["metrics"], exact["metrics"]))

        err_dev = statistics.median(
            abs((m["policy_err_w"] + m["policy_err_l"]) - (e["policy_err_w"] + e["policy_err_l"]))
            / (e["policy_err_w"] + e["policy_err_l"]) for m, e in zip(r["metrics"], exact["metrics"]))
        d, e = r["delta"], exact["delta"]
        distance = float((d - e).norm() / e.norm())
        cosine = float(d @ e / (d.norm() * e.norm()))
        print(f"| {name} | {err_dev:.3g} | {dev('loss'):.3g} | {distance:.3g} | {cosine:.4f} |")


if __name__ == "__main__":
    main()
