"""report.md of `ncppo demo`: the table, the timings, the figures, and where the betas come from."""

from __future__ import annotations

from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def headline_table(results: dict) -> str:
    """The demo's numbers as docs/toy.md shows them (a markdown table; tests/test_toy_demo.py checks
    the quick demo's copy there against a fresh run, at this precision)."""
    rows = ["| model | mean judge score | win rate vs base [95% CI] |", "|---|---|---|",
            f"| base | {results['base']['mean_score']:.3f} | - |"]
    for key, name in (("latent", "latent-DPO"), ("ncp", "NCP-DPO")):
        r = results[key]
        lo, hi = r["win_rate_vs_base_ci95"]
        rows.append(f"| {name} | {r['mean_score']:.3f} | {_pct(r['win_rate_vs_base'])} [{_pct(lo)}, {_pct(hi)}] |")
    h2h = results["ncp_vs_latent"]
    lo, hi = h2h["ci95"]
    rows.append(f"| NCP-DPO vs latent-DPO, head to head | | {_pct(h2h['win_rate'])} [{_pct(lo)}, {_pct(hi)}] |")
    return "\n".join(rows)


def write_report(path: Path, results: dict, cfg, resolved: dict, study: dict | None) -> Path:
    t = results["timings_s"]
    ev = results["eval"]
    lines = [
        "# ncppo demo: latent-DPO vs NCP-DPO in the toy world", "",
        f"Base: `{resolved['model']}`. {resolved['pairs']} judge-labelled pairs on the train prompts; "
        f"{results['steps']} steps of LoRA (rank {cfg.lora_rank}) DPO per method, batch {resolved['batch_size']} pairs, "
        f"seed {cfg.seed} (one training seed: this run alone cannot say which method is better; see the study). "
        f"Held-out eval: {len(ev['prompts'])} prompts x {ev['seeds_per_prompt']} seeds = {ev['images']} images per "
        f"model, DDIM {resolved['sample_steps']} steps, guidance {cfg.guidance}. Win rates: share of (prompt, seed) "
        "where the model's image outscores the other's (ties count half); 95% two-stage bootstrap intervals "
        "(prompts, then seeds inside them, widened for few prompts).", "",
        "| model | beta | effective raw beta | mean judge score [95% CI] | win rate vs base [95% CI] |",
        "|---|---|---|---|---|",
        f"| base | - | - | {results['base']['mean_score']:.3f} | - |",
    ]
    for key, name in (("latent", "latent-DPO"), ("ncp", "NCP-DPO")):
        r, s = results[key], results["settings"][key]
        lo, hi = r["win_rate_vs_base_ci95"]
        mlo, mhi = r.get("mean_score_ci95", (float("nan"), float("nan")))
        beta = f"{s['beta']:g}" + (" (normalised)" if s.get("beta_normalize") else "")
        eff = "-" if s.get("effective_beta") is None else f"{s['effective_beta']:.3g}"
        lines.append(f"| {name} | {beta} | {eff} | {r['mean_score']:.3f} [{mlo:.3f}, {mhi:.3f}] | "
                     f"{_pct(r['win_rate_vs_base'])} [{_pct(lo)}, {_pct(hi)}] |")
    h2h = results["ncp_vs_latent"]
    lo, hi = h2h["ci95"]
    lines += ["", f"Head to head, NCP-DPO vs latent-DPO: **{_pct(h2h['win_rate'])}** [{_pct(lo)}, {_pct(hi)}].", ""]
    reach = results["ncp_steps_to_latent_final"]
    target = results["latent_final_curve_score"]
    if target is not None:
        lines.append(f"Steps NCP-DPO needed to reach latent-DPO's final curve score ({target:.3f}, "
                     f"{ev.get('curve_images', '?')} images a point): "
                     + (f"**{reach}** of {results['steps']}." if reach is not None
                        else f"not reached within {results['steps']} steps."))
        lines.append("")
    lines += ["| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
    lines += ["", "![judge score over steps, 95% bands](judge_over_steps.png)", "",
              "![samples: rows base, latent-DPO, NCP-DPO; columns: prompt and seed](samples.png)", ""]
    if study:
        lines += ["## Where the betas come from", "",
                  f"`ncppo toy study` (docs/study.md): normalised-beta grids per space on the validation prompts, "
                  f"and its held-out comparison over training seeds used latent "
                  f"{(study.get('final_beta') or study['chosen'])['latent']:g} and NCP "
                  f"{(study.get('final_beta') or study['chosen'])['ncp']:g}. "
                  + (study.get("headline") or ""), ""]
    else:
        lines += ["No study record shipped (run `ncppo toy study`).", ""]
    path.write_text("\n".join(lines))
    return path
