"""The summary of `ncppo iterate`: summary.json, a markdown table over rounds and summary.png
(proxy and gold rewards per round with 95% intervals, win rate against the base)."""

from __future__ import annotations

import json
from pathlib import Path


def _ci(entry: dict | None, percent: bool = False) -> str:
    if not entry:
        return "-"
    value = entry.get("mean", entry.get("win_rate"))
    lo, hi = entry["ci95"]
    if percent:
        return f"{100 * value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{value:.4g} [{lo:.4g}, {hi:.4g}]"


def table(summary: dict) -> str:
    """One row per evaluated stage (base, warm start, rounds): pairs, proxy and gold means, win rates."""
    scorers = summary["labelling_scorers"]
    gold = summary.get("gold_scorer")
    metrics = scorers + ([gold] if gold else [])
    head = ["round", "pairs (near ties)"] + [f"{m} (proxy)" if m != gold else f"{m} (gold)" for m in metrics] + [
        f"{m} win vs base" for m in metrics]
    rows = [["base", "-"] + [_ci(summary["base"]["scores"][m]) for m in metrics] + ["-"] * len(metrics)]
    for r in summary["rounds"]:
        ev = r.get("eval") or {}
        pairs = r.get("pairs")
        rows.append([str(r["round"]) + (" (stop)" if r.get("stop") else ""),
                     f"{pairs['pairs']} ({pairs['near_ties']})" if pairs else "-"]
                    + [_ci((ev.get("scores") or {}).get(m)) for m in metrics]
                    + [_ci((ev.get("win_rate_vs_base") or {}).get(m), percent=True) for m in metrics])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_summary(out: Path, summary: dict) -> None:
    """summary.json, summary.md and summary.png in `out`."""
    from ..manifest import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    lines = ["# ncppo iterate", "",
             f"Labelling (proxy) scorers: {', '.join(summary['labelling_scorers'])}; gold scorer: "
             f"{summary.get('gold_scorer') or 'none'}. Means over the held-out prompts with 95% two-stage bootstrap "
             "intervals (prompts, then seeds); win rates against the base on the same prompts and seeds, ties half.",
             "", table(summary), ""]
    if summary.get("stopped"):
        lines += [f"Stopped by the gold guard: {summary['stopped']}.", ""]
    best = summary.get("best")
    if best:
        where = f"`best/` ({best['lora']})" if best["lora"] else "the base model (best/best.json names it)"
        lines += [f"Best gold: round {best['round']}, {best['gold']:.4g}: {where}.", ""]
    lines += ["![proxy and gold reward per round](summary.png)", ""]
    atomic_write_text(out / "summary.md", "\n".join(lines))
    plot(out / "summary.png", summary)


def plot(path: Path, summary: dict):
    """One panel per scorer (mean per round with its interval; base dashed) and one of win rates."""
    from ..plots import Panel, multi_panel

    gold = summary.get("gold_scorer")
    metrics = summary["labelling_scorers"] + ([gold] if gold else [])
    stages = [r for r in summary["rounds"] if r.get("eval")]
    x = {id(r): (-0.5 if r["round"] == "warm-start" else r["round"]) for r in stages}
    panels = []
    for m in metrics:
        base = summary["base"]["scores"][m]
        points = [(-1, base["mean"], *base["ci95"])] + [(x[id(r)], r["eval"]["scores"][m]["mean"],
                                                          *r["eval"]["scores"][m]["ci95"]) for r in stages]
        label = f"{m} ({'gold' if m == gold else 'proxy'})"
        panels.append(Panel({label: points}, ylabel=f"mean {m}", hline=base["mean"], hline_label="base"))
    wins = {m: [(x[id(r)], r["eval"]["win_rate_vs_base"][m]["win_rate"], *r["eval"]["win_rate_vs_base"][m]["ci95"])
                for r in stages if r["eval"].get("win_rate_vs_base")] for m in metrics}
    panels.append(Panel(wins, ylabel="win rate vs base", percent=True, hline=0.5, hline_label="parity"))
    return multi_panel(path, panels, xlabel="round (-1 = base)", title="ncppo iterate: held-out prompts, 95% intervals")
