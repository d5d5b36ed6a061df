"""Statistics, report.md and figures of `ncppo toy study`, computed from its results.json.

Every interval is a 95% two-stage bootstrap interval (`ncppo.evaluate.stats`): over the prompts
(and the seeds inside them) for one training run; over training seeds and prompts crossed (then
the images inside each cell) when runs of several training seeds are pooled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..evaluate.stats import two_stage_bootstrap, win_rate_interval, win_values
from ..objectives import method_name

SPACES = ("latent", "ncp")
NAMES = {space: method_name(space, "dpo") for space in ("latent", "ncp")}


def _prompt_groups(prompts: list[str]) -> np.ndarray:
    return np.unique(np.asarray(prompts), return_inverse=True)[1].reshape(-1)


def _runs(data: dict, *, phase: str, objective: str = "dpo", space: str | None = None, mode="t-1",
          layers="down") -> list[dict]:
    out = []
    for r in data["runs"].values():
        s = r["spec"]
        if r["phase"] != phase or s["objective"] != objective or (space and s["space"] != space):
            continue
        if s["space"] == "ncp" and (s["timestep_mode"], s["ncp_layers"]) != (mode, layers):
            continue
        out.append(r)
    return sorted(out, key=lambda r: (r["spec"]["beta"], r["spec"]["seed"]))


def grid_table(data: dict, space: str, objective: str = "dpo", n_resamples: int = 4000) -> list[dict]:
    """One row per grid value: mean validation score over its training seeds, its difference from
    the grid's best (paired on the same images and training seeds) with an interval, and the
    measured error scale / effective raw beta."""
    by_beta: dict[float, dict[int, dict]] = {}
    for r in _runs(data, phase="grid", objective=objective, space=space):
        by_beta.setdefault(r["spec"]["beta"], {})[r["spec"]["seed"]] = r
    if not by_beta:
        return []
    base = data["base"]["validation"]
    prompts = _prompt_groups(base["prompts"])
    mean = {b: float(np.mean([np.mean(r["scores"]) for r in runs.values()])) for b, runs in by_beta.items()}
    top = max(mean, key=mean.get)
    rows = []
    for beta, runs in sorted(by_beta.items()):
        shared = sorted(set(runs) & set(by_beta[top]))
        diff = np.concatenate([np.asarray(runs[k]["scores"]) - np.asarray(by_beta[top][k]["scores"]) for k in shared])
        groups = (np.stack([np.repeat(np.arange(len(shared)), len(prompts)), np.tile(prompts, len(shared))], 1)
                  if len(shared) > 1 else prompts)
        lo, hi = two_stage_bootstrap(diff, groups, n_resamples=n_resamples) if beta != top else (0.0, 0.0)
        bn = runs[min(runs)].get("beta_normalization") or {}
        wins = np.concatenate([win_values(r["scores"], base["scores"]) for r in runs.values()])
        rows.append(dict(beta=beta, seeds=sorted(runs), mean=mean[beta], diff=float(diff.mean()), diff_ci=[lo, hi],
                         diff_seeds=shared, best=beta == top, error_scale=bn.get("error_scale"),
                         effective_beta=bn.get("effective_beta"), win_vs_base=float(wins.mean())))
    return rows


def common_beta(tables: dict[str, list[dict]]) -> float | None:
    """The normalised beta tried in every table whose worst shortfall from a table's best is smallest."""
    shared = set.intersection(*({row["beta"] for row in rows} for rows in tables.values())) if tables else set()
    if not shared:
        return None
    return max(sorted(shared), key=lambda b: min(row["diff"] for rows in tables.values() for row in rows
                                                 if row["beta"] == b))


def _near_best(rows: list[dict], beta: float) -> bool | None:
    row = next((r for r in rows if r["beta"] == beta), None)
    return None if row is None else bool(row["best"] or row["diff_ci"][1] >= 0)


def pooled(runs: list[dict], base: dict, n_resamples: int) -> dict:
    """Mean score and win rate vs the base of runs of several seeds on the same held-out images."""
    prompts = _prompt_groups(base["prompts"])
    scores = np.concatenate([r["scores"] for r in runs])
    groups = np.stack([np.repeat(np.arange(len(runs)), len(prompts)), np.tile(prompts, len(runs))], 1)
    wins = np.concatenate([win_values(r["scores"], base["scores"]) for r in runs])
    diff = scores - np.tile(np.asarray(base["scores"]), len(runs))
    lo, hi = two_stage_bootstrap(scores, groups, n_resamples=n_resamples)
    dlo, dhi = two_stage_bootstrap(diff, groups, n_resamples=n_resamples)
    wlo, whi = win_rate_interval(wins, groups, n_resamples=n_resamples)
    return dict(seeds=[r["spec"]["seed"] for r in runs], beta=runs[0]["spec"]["beta"], mean=float(scores.mean()),
                mean_ci=[lo, hi], diff_vs_base=float(diff.mean()), diff_vs_base_ci=[dlo, dhi],
                win_vs_base=float(wins.mean()), win_vs_base_ci=[wlo, whi],
                per_seed=[float(np.mean(r["scores"])) for r in runs])


def head_to_head(a: list[dict], b: list[dict], base: dict, n_resamples: int) -> dict | None:
    """Win rate of runs `a` over runs `b` of the same training seeds, pooled and per seed."""
    by_seed = {r["spec"]["seed"]: r for r in b}
    pairs = [(r, by_seed[r["spec"]["seed"]]) for r in a if r["spec"]["seed"] in by_seed]
    if not pairs:
        return None
    prompts = _prompt_groups(base["prompts"])
    wins = [win_values(x["scores"], y["scores"]) for x, y in pairs]
    flat = np.concatenate(wins)
    groups = np.stack([np.repeat(np.arange(len(pairs)), len(prompts)), np.tile(prompts, len(pairs))], 1)
    lo, hi = win_rate_interval(flat, groups, n_resamples=n_resamples)
    diff = np.concatenate([np.asarray(x["scores"]) - np.asarray(y["scores"]) for x, y in pairs])
    dlo, dhi = two_stage_bootstrap(diff, groups, n_resamples=n_resamples)
    per_seed = []
    for (x, _), w in zip(pairs, wins):
        slo, shi = win_rate_interval(w, prompts, n_resamples=n_resamples)
        per_seed.append(dict(seed=x["spec"]["seed"], win_rate=float(w.mean()), ci=[slo, shi]))
    return dict(win_rate=float(flat.mean()), ci=[lo, hi], mean_diff=float(diff.mean()), mean_diff_ci=[dlo, dhi],
                seeds=len(pairs), images=int(flat.size), per_seed=per_seed)


def curves(runs: list[dict], n_resamples: int) -> list[dict]:
    """Mean held-out score per curve step over training seeds, with a 95% band over the training
    seeds (the curve images fixed: the band shows how much training runs differ, not how much the
    prompts do)."""
    steps = sorted({h["step"] for r in runs for h in r.get("curve") or []})
    out = []
    for step in steps:
        per_run = [next(h["scores"] for h in r["curve"] if h["step"] == step) for r in runs
                   if any(h["step"] == step for h in r.get("curve") or [])]
        if not per_run:
            continue
        per_seed = [float(np.mean(s)) for s in per_run]
        lo, hi = two_stage_bootstrap(per_seed, n_resamples=n_resamples) if len(per_seed) > 1 else (None, None)
        out.append(dict(step=step, mean=float(np.mean(per_seed)), low=lo, high=hi, seeds=len(per_run),
                        per_seed=per_seed))
    return out


def steps_to_reach(a: list[dict], b: list[dict], n_resamples: int = 2000, seed: int = 0) -> dict | None:
    """Steps `a` needs (pooled curve, seed mean) to reach `b`'s final pooled curve score, and a
    bootstrap interval resampling the training seeds (both methods' seeds together)."""
    by_seed = {r["spec"]["seed"]: r for r in b}
    pairs = [(x, by_seed[x["spec"]["seed"]]) for x in a if x["spec"]["seed"] in by_seed]
    if not pairs or not pairs[0][0].get("curve"):
        return None
    steps = [h["step"] for h in pairs[0][0]["curve"]]
    ca = np.array([[np.mean(h["scores"]) for h in x["curve"]] for x, _ in pairs])  # (seeds, steps)
    cb = np.array([[np.mean(h["scores"]) for h in y["curve"]] for _, y in pairs])

    def reach(idx) -> float:
        target = cb[idx, -1].mean()
        curve = ca[idx].mean(0)
        hit = [s for s, v in zip(steps, curve) if s > 0 and v >= target]
        return float(hit[0]) if hit else math.inf

    point = reach(np.arange(len(pairs)))
    rng = np.random.default_rng(seed)
    draws = np.array([reach(rng.integers(0, len(pairs), len(pairs))) for _ in range(n_resamples)])
    # "never" ranks above every step: quantiles on a stand-in past the budget, mapped back to inf
    beyond = steps[-1] + 1.0
    lo, hi = (math.inf if q > steps[-1] else float(q)
              for q in np.quantile(np.where(np.isinf(draws), beyond, draws), [0.025, 0.975], method="lower"))
    return dict(steps=None if math.isinf(point) else point, ci=[_finite(lo), _finite(hi)],
                never_share=float(np.isinf(draws).mean()), target=float(cb[:, -1].mean()), seeds=len(pairs),
                budget=steps[-1])


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else float(x)


def final_betas(data: dict) -> dict:
    """Per space, the beta of the final phase: as recorded, else the one most of its runs used."""
    used = dict(data.get("final_beta") or {})
    for space in SPACES:
        if space not in used:
            betas = [r["spec"]["beta"] for r in _runs(data, phase="final", space=space)]
            if betas:
                used[space] = max(sorted(set(betas)), key=betas.count)
    return used


def summarise(data: dict, n_resamples: int = 10000) -> dict:
    """Everything the report states, from the stored runs."""
    s: dict = {"grids": {}, "objectives": {}, "final": {}, "variants": {}}
    for space in SPACES:
        s["grids"][space] = grid_table(data, space, "dpo")
    tables = {k: v for k, v in s["grids"].items() if v}
    common = common_beta(tables) if len(tables) == len(SPACES) else None
    s["common_beta"] = common
    s["chosen"] = {space: next((r["beta"] for r in rows if r["best"]), None) for space, rows in s["grids"].items()}
    s["interior"] = {space: bool(rows) and not (rows[0]["best"] or rows[-1]["best"])
                     for space, rows in s["grids"].items()}
    s["common_near_best"] = {space: _near_best(rows, common) for space, rows in tables.items()} if common else {}
    objectives = sorted({r["spec"]["objective"] for r in data["runs"].values() if r["phase"] == "grid"} - {"dpo"})
    for objective in objectives:
        rows = {space: grid_table(data, space, objective) for space in SPACES}
        tried = sorted(set.intersection(*({r["beta"] for r in v} for v in rows.values() if v))) \
            if any(rows.values()) else []
        # the value these runs centred on (the DPO common value when they ran): the middle one tried
        checked = tried[len(tried) // 2] if tried else None
        s["objectives"][objective] = dict(rows=rows, checked_beta=checked,
                                          best={space: next((r["beta"] for r in v if r["best"]), None)
                                                for space, v in rows.items()},
                                          near_best={space: _near_best(v, checked) for space, v in rows.items()
                                                     if v and checked is not None})
    base = data["base"].get("eval")
    final = {space: _runs(data, phase="final", space=space) for space in SPACES}
    # the runs at the beta the final phase used, should a later grid (more seeds) have moved the choice
    used = final_betas(data)
    final = {space: [r for r in runs if r["spec"]["beta"] == used.get(space)] for space, runs in final.items()}
    s["final_beta"] = used
    if base and all(final.values()):
        s["final"] = dict(
            base_mean=float(np.mean(base["scores"])), images_per_model_and_seed=len(base["scores"]),
            spaces={space: pooled(runs, base, n_resamples) for space, runs in final.items()},
            ncp_vs_latent=head_to_head(final["ncp"], final["latent"], base, n_resamples),
            curves={space: curves(runs, min(n_resamples, 4000)) for space, runs in final.items()},
            ncp_steps_to_latent_final=steps_to_reach(final["ncp"], final["latent"]),
            latent_steps_to_ncp_final=steps_to_reach(final["latent"], final["ncp"]),
            seconds_per_run={space: float(np.mean([r.get("seconds", 0) for r in runs])) for space, runs in final.items()})
    variants = {}
    for r in data["runs"].values():
        if r["phase"] == "variants":
            variants.setdefault(f"{r['spec']['timestep_mode']}/{r['spec']['ncp_layers']}", []).append(r)
    if base and variants:
        reference = dict(variants)
        if final.get("ncp"):
            reference = {"t-1/down": final["ncp"], **variants}
        for name, runs in reference.items():
            runs = sorted(runs, key=lambda r: r["spec"]["seed"])
            seeds = {r["spec"]["seed"] for r in runs}
            if name == "t-1/down":
                runs = [r for r in runs if r["spec"]["seed"] in {x["spec"]["seed"] for v in variants.values()
                                                                   for x in v}] or runs
                seeds = {r["spec"]["seed"] for r in runs}
            entry = pooled(runs, base, n_resamples)
            bn = [r.get("beta_normalization") or {} for r in runs]
            entry["error_scale"] = float(np.mean([b["error_scale"] for b in bn if b.get("error_scale")] or [np.nan]))
            entry["beta"] = runs[0]["spec"]["beta"]
            entry["vs_latent"] = head_to_head(runs, [r for r in final.get("latent", []) if r["spec"]["seed"] in seeds],
                                              base, n_resamples)
            if name != "t-1/down" and final.get("ncp"):
                entry["vs_t1_down"] = head_to_head(runs, final["ncp"], base, n_resamples)
            variants[name] = entry
        s["variants"] = {name: variants[name] for name in reference}
    return s


# ---------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(ci, pct=True) -> str:
    f = _pct if pct else (lambda v: f"{v:.3f}")
    return f"[{f(ci[0])}, {f(ci[1])}]"


def _raw(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _device_text(dev: dict) -> str:
    return (f"{dev.get('cuda')} (fp32)" if dev.get("cuda") else
            f"CPU, {dev.get('cpu_count')} cores ({dev.get('machine')}), {dev.get('torch_threads')} torch threads, "
            f"fp32, torch {dev.get('torch')}")


def compact(data: dict, s: dict) -> dict:
    """The few numbers the demo ships (assets/study.json): the chosen normalised betas and the headline."""
    out = dict(chosen=s["chosen"], final_beta=s.get("final_beta"), common_beta=s["common_beta"],
               common_near_best=s["common_near_best"],
               interior=s["interior"], device=_device_text(data.get("device", {})))
    f = s.get("final")
    if f:
        h = f["ncp_vs_latent"]
        out["ncp_vs_latent"] = {k: h[k] for k in ("win_rate", "ci", "seeds", "images")}
        out["mean_score"] = {space: {k: e[k] for k in ("mean", "mean_ci", "win_vs_base", "win_vs_base_ci")}
                             for space, e in f["spaces"].items()}
        out["headline"] = (f"Held out, {h['seeds']} training seeds x {h['images'] // h['seeds']} images: NCP-DPO vs "
                           f"latent-DPO {_pct(h['win_rate'])} {_ci(h['ci'])} ({out['device']}).")
    return out


def write_study_report(out: Path, data: dict, cfg) -> Path:
    """report.md, results.json's "summary", study_summary.json and the figures, in `out`."""
    s = summarise(data, cfg.bootstrap)
    data["summary"] = s
    (out / "results.json").write_text(json.dumps(data, indent=1))
    (out / "study_summary.json").write_text(json.dumps(compact(data, s), indent=1))
    device = _device_text(data.get("device", {}))
    val = data["base"].get("validation")
    c = data.get("config", {})
    lines = ["# ncppo toy study: latent-DPO vs NCP-DPO, and one normalised beta", "",
             f"Measured here on: {device}. Every run: LoRA rank {c.get('lora_rank')}, {c.get('steps')} steps of "
             f"{c.get('batch_size')} pairs, lr {c.get('lr')}, {c.get('pairs')} judge-labelled pairs per training seed, "
             f"`--beta-normalize` (beta divided by the mean reference error of the first "
             f"{c.get('beta_normalize_batches')} micro-batches). Images: DDIM {c.get('sample_steps')} steps, guidance "
             f"{c.get('guidance')}, scored by the toy judge. Intervals: 95% two-stage bootstrap (prompts, then seeds "
             "inside them; training seeds and prompts crossed when seeds are pooled), widened for few prompts "
             "(docs/evaluation.md).", ""]
    lines += ["## 1. Beta grids (DPO, validation prompts; training seed 0, the best values also 10, 11, ...)", ""]
    if val:
        lines.append(f"{len(val['scores'])} validation images per grid point ({len(set(val['prompts']))} prompts x "
                     f"{len(val['scores']) // max(1, len(set(val['prompts'])))} seeds); base mean "
                     f"{np.mean(val['scores']):.3f}. Difference: paired on the same images, vs the grid's best.")
        lines.append("")
    lines += ["| space | normalised beta | error scale | raw beta (effective) | training seeds | mean score | "
              "vs best [95% CI] | win vs base |", "|---|---|---|---|---|---|---|---|"]
    for space, rows in s["grids"].items():
        for r in rows:
            mark = " **best**" if r["best"] else ""
            lines.append(f"| {NAMES[space]}{mark} | {r['beta']:g} | {_raw(r['error_scale'])} | "
                         f"{_raw(r['effective_beta'])} | {len(r['seeds'])} | {r['mean']:.3f} | {r['diff']:+.3f} "
                         f"{_ci(r['diff_ci'], pct=False)} | {_pct(r['win_vs_base'])} |")
    lines.append("")
    chosen_rows = {space: next((r for r in rows if r["best"]), None) for space, rows in s["grids"].items()}
    if all(chosen_rows.values()) and all(r["effective_beta"] for r in chosen_rows.values()):
        raw = {k: r["effective_beta"] for k, r in chosen_rows.items()}
        norm = {k: r["beta"] for k, r in chosen_rows.items()}
        lines.append(f"- The best raw betas differ {max(raw.values()) / min(raw.values()):.3g}x between the spaces "
                     f"({', '.join(f'{NAMES[k]} {v:.3g}' for k, v in raw.items())}); normalised, "
                     f"{max(norm.values()) / min(norm.values()):.3g}x.")
    for space, ok in s["interior"].items():
        if s["grids"][space]:
            lines.append(f"- {NAMES[space]}: best normalised beta {s['chosen'][space]:g} "
                         + ("(interior: worse values on both sides)." if ok else "(**on the grid's edge**)."))
    if s["common_beta"] is not None:
        near = s["common_near_best"]
        lines.append(f"- One value for both spaces: {s['common_beta']:g} (smallest worst shortfall from each grid's "
                     "best); within noise of the best (interval of the difference reaches 0): "
                     + ", ".join(f"{NAMES[k]} {'yes' if v else 'no'}" for k, v in near.items()) + ".")
    lines.append("")
    if s["objectives"]:
        lines += ["## 2. Does the normalised beta transfer across objectives?", "",
                  "Other objectives at the DPO common normalised beta (when they ran) x factors, both spaces, training "
                  f"seed 0, the same validation images (base mean {np.mean(val['scores']):.3f}).",
                  "", "| objective | space | normalised beta | raw beta (effective) | mean score | vs best [95% CI] | "
                  "win vs base |", "|---|---|---|---|---|---|---|"]
        for objective, entry in s["objectives"].items():
            for space, rows in entry["rows"].items():
                for r in rows:
                    mark = " **best**" if r["best"] else ""
                    lines.append(f"| {objective} | {space}{mark} | {r['beta']:g} | {_raw(r['effective_beta'])}"
                                 f" | {r['mean']:.3f} | {r['diff']:+.3f} {_ci(r['diff_ci'], pct=False)} | "
                                 f"{_pct(r['win_vs_base'])} |")
            near = entry["near_best"]
            lines.append("")
            if entry["checked_beta"] is not None:
                lines.append(f"{objective}: best normalised beta "
                             + ", ".join(f"{k} {v:g}" for k, v in entry["best"].items() if v is not None)
                             + f"; {entry['checked_beta']:g} is within noise of the best in "
                             + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in near.items()) + ".")
            lines.append("")
    f = s.get("final")
    if f:
        n_seeds = len(f["spaces"]["ncp"]["seeds"])
        lines += ["## 3. Held-out comparison at each space's best beta", "",
                  f"{n_seeds} training seeds per method ({', '.join(str(x) for x in f['spaces']['ncp']['seeds'])}; "
                  f"the grid used seed 0), {f['images_per_model_and_seed']} held-out images per model and seed "
                  f"(6 eval prompts never used for choosing); base mean {f['base_mean']:.3f}.", "",
                  "| method | normalised beta | mean score [95% CI] | per seed | score - base [95% CI] | "
                  "win vs base [95% CI] |", "|---|---|---|---|---|---|"]
        for space, e in f["spaces"].items():
            lines.append(f"| {NAMES[space]} | {e['beta']:g} | {e['mean']:.3f} {_ci(e['mean_ci'], False)} | "
                         + ", ".join(f"{x:.2f}" for x in e["per_seed"])
                         + f" | {e['diff_vs_base']:+.3f} {_ci(e['diff_vs_base_ci'], False)}"
                         + f" | {_pct(e['win_vs_base'])} {_ci(e['win_vs_base_ci'])} |")
        h = f["ncp_vs_latent"]
        lines += ["", "(Mean-score intervals include how much the 6 prompts differ; the differences and win rates "
                      "are paired on the same images.)", "",
                  f"**NCP-DPO vs latent-DPO, head to head, pooled over {h['seeds']} seeds x "
                  f"{h['images'] // h['seeds']} images: win rate {_pct(h['win_rate'])} {_ci(h['ci'])}; mean score "
                  f"difference {h['mean_diff']:+.3f} {_ci(h['mean_diff_ci'], False)}.** Per seed: "
                  + "; ".join(f"seed {p['seed']} {_pct(p['win_rate'])} {_ci(p['ci'])}" for p in h["per_seed"]) + ".",
                  ""]
        for key, a, b in (("ncp_steps_to_latent_final", "NCP-DPO", "latent-DPO"),
                          ("latent_steps_to_ncp_final", "latent-DPO", "NCP-DPO")):
            r = f[key]
            if r:
                lo, hi = r["ci"]
                text = "not within the budget" if r["steps"] is None else f"{r['steps']:.0f}"
                lines.append(f"- Steps {a} needs to reach {b}'s final curve score ({r['target']:.3f}, mean of "
                             f"{r['seeds']} seeds): **{text}** of {r['budget']}; 95% interval over seeds "
                             f"[{'>budget' if lo is None else f'{lo:.0f}'}, {'>budget' if hi is None else f'{hi:.0f}'}]"
                             f" (not reached in {_pct(r['never_share'])} of resamples).")
        lines += ["", "![held-out score over steps, 95% bands](curves.png)", ""]
    if s["variants"]:
        lines += ["## 4. NCP variants (timestep mode / encoder layers)", "",
                  "Each at NCP-DPO's best normalised beta (no own grid: this also tests the normalisation), "
                  "same held-out images.", "",
                  "| variant | error scale | seeds | mean score [95% CI] | win vs base | vs latent-DPO | vs t-1/down |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in s["variants"].items():
            vl, vt = e.get("vs_latent"), e.get("vs_t1_down")
            lines.append(f"| {name} | {_raw(e['error_scale'])} | {len(e['seeds'])} | {e['mean']:.3f} "
                         f"{_ci(e['mean_ci'], False)} | {_pct(e['win_vs_base'])} {_ci(e['win_vs_base_ci'])} | "
                         + (f"{_pct(vl['win_rate'])} {_ci(vl['ci'])}" if vl else "-") + " | "
                         + (f"{_pct(vt['win_rate'])} {_ci(vt['ci'])}" if vt else "-") + " |")
        lines.append("")
    lines += ["![validation score over the normalised beta grid](grid.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    write_study_figures(out, s)
    return out / "report.md"


def write_study_figures(out: Path, s: dict) -> None:
    """curves.png (held-out score over steps, if the final phase ran) and grid.png (the DPO beta
    grids) from a `summarise` dict, e.g. the "summary" stored in results.json:
    `write_study_figures(Path("docs/study"), json.load(open("docs/study/results.json"))["summary"])`."""
    from .figures import beta_scan, score_curves

    f = s.get("final")
    if f:
        series = {space: [(p["step"], p["mean"], p["low"], p["high"]) for p in f["curves"][space]]
                  for space in SPACES}
        target = f["ncp_steps_to_latent_final"]["target"] if f.get("ncp_steps_to_latent_final") else None
        score_curves(out / "curves.png", series, target, title="held-out prompts, mean of training seeds, "
                     "95% band over seeds", ylabel="mean toy-judge score (held out)")
    beta_scan(out / "grid.png", {space: [(r["beta"], r["mean"], r["mean"] + r["diff_ci"][0] - r["diff"],
                                          r["mean"] + r["diff_ci"][1] - r["diff"]) for r in rows]
                                 for space, rows in s["grids"].items() if rows})
