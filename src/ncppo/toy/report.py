"""report.md of `ncppo demo`: the table, the tuning grid, the timings, the figures."""

from __future__ import annotations

from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_report(path: Path, results: dict, cfg, resolved: dict, tune: dict | None) -> Path:
    t = results["timings_s"]
    ev = results["eval"]
    lines = [
        "# ncppo demo: latent-DPO vs NCP-DPO in the toy world", "",
        f"Base: `{resolved['model']}`. {resolved['pairs']} judge-labelled pairs on the train prompts; "
        f"{results['steps']} steps of LoRA (rank {cfg.lora_rank}) DPO per method, batch {cfg.batch_size} pairs, "
        f"seed {cfg.seed}. Held-out eval: {len(ev['prompts'])} prompts x {ev['seeds_per_prompt']} seeds = "
        f"{ev['images']} images per model, DDIM {cfg.sample_steps} steps, guidance {cfg.guidance}. Win rates: "
        "share of (prompt, seed) where the model's image outscores the other's (ties count half); "
        "95% paired-bootstrap intervals.", "",
        "| model | beta | lr | mean judge score | win rate vs base [95% CI] |", "|---|---|---|---|---|",
        f"| base | - | - | {results['base']['mean_score']:.3f} | - |",
    ]
    for key, name in (("latent", "latent-DPO"), ("ncp", "NCP-DPO")):
        r, s = results[key], results["settings"][key]
        lo, hi = r["win_rate_vs_base_ci95"]
        lines.append(f"| {name} | {s['beta']:g} | {s['lr']:g} | {r['mean_score']:.3f} | "
                     f"{_pct(r['win_rate_vs_base'])} [{_pct(lo)}, {_pct(hi)}] |")
    h2h = results["ncp_vs_latent"]
    lo, hi = h2h["ci95"]
    lines += ["", f"Head to head, NCP-DPO vs latent-DPO: **{_pct(h2h['win_rate'])}** [{_pct(lo)}, {_pct(hi)}].", ""]
    reach = results["ncp_steps_to_latent_final"]
    target = results["latent_final_curve_score"]
    if target is not None:
        lines.append(f"Steps NCP-DPO needed to reach latent-DPO's final curve score ({target:.3f}): "
                     + (f"**{reach}** of {results['steps']}." if reach is not None
                        else f"not reached within {results['steps']} steps."))
        lines.append("")
    lines += ["| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
    lines += ["", "![judge score over steps](judge_over_steps.png)", "",
              "![samples: rows base, latent-DPO, NCP-DPO; same prompt and seed per column](samples.png)", ""]
    if tune:
        lines += [f"## Beta / lr grid (`ncppo toy tune`, validation prompts, {tune['steps']} steps, "
                  f"{tune['val_seeds']} seeds per prompt)", "",
                  "| space | beta | lr | final validation score | win rate vs base |", "|---|---|---|---|---|"]
        for g in tune["grid"]:
            chosen = tune["chosen"][g["space"]]
            mark = " (chosen)" if chosen["beta"] == g["beta"] and chosen["lr"] == g["lr"] else ""
            wr = "n/a" if g.get("win_rate_vs_base") is None else _pct(g["win_rate_vs_base"])
            lines.append(f"| {g['space']}{mark} | {g['beta']:g} | {g['lr']:g} | {g['mean_score']:.3f} | {wr} |")
        lines.append("")
    else:
        lines += ["No tuning record shipped (run `ncppo toy tune`).", ""]
    path.write_text("\n".join(lines))
    return path
