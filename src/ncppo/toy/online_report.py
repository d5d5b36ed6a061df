"""Statistics, report.md and figures of `ncppo toy online`, from its results.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .study_report import NAMES, curves, head_to_head, pooled


def _runs(data: dict, arm: str, space: str | None = None) -> list[dict]:
    return sorted([r for r in data["runs"].values() if r["spec"]["arm"] == arm
                   and (space is None or r["spec"]["space"] == space)], key=lambda r: r["spec"]["seed"])


def _curve_runs(runs: list[dict], key: str) -> list[dict]:
    return [{"spec": r["spec"], "curve": [{"step": h["step"], "scores": h[key]} for h in r["curve"] if key in h]}
            for r in runs]


def _kept(run: dict, steps_per_round: int) -> dict:
    """The curve entry of a guarded run's result: its best round's (step 0 when the base was best)."""
    best = run.get("best_round")
    step = 0 if best in (None, "base") else (best + 1) * steps_per_round
    return next(h for h in run["curve"] if h["step"] == step)


def _held(run: dict, steps: list[int], steps_per_round: int) -> dict:
    """A guarded run's curve as what it holds at each step: after a guard stop, the kept best round's
    curve scores carried forward (so every seed counts at every step of the figure)."""
    curve = list(run["curve"])
    kept = _kept(run, steps_per_round)
    done = {h["step"] for h in curve}
    curve += [{**kept, "step": step} for step in steps if step not in done and step > max(done)]
    return {**run, "curve": sorted(curve, key=lambda h: h["step"])}


def summarise(data: dict, cfg) -> dict:
    """Pooled scores, win rates and head-to-heads with their intervals; curves over training seeds."""
    n = cfg.bootstrap
    base = {"prompts": data["base"]["prompts"], "scores": data["base"]["toy-judge"]}
    out: dict = {"base": {"mean": float(np.mean(base["scores"])),
                          "proxy_mean": float(np.mean(data["base"]["toy-proxy"]))}, "compare": {}, "hack": {}}
    for space in ("latent", "ncp"):
        arms = {arm: _runs(data, arm, space) for arm in ("offline", "online")}
        if not all(arms.values()):
            continue
        entry = {arm: pooled(runs, base, n) | {"curve": curves(_curve_runs(runs, "toy-judge"), n)}
                 for arm, runs in arms.items()}
        entry["online_vs_offline"] = head_to_head(arms["online"], arms["offline"], base, n)
        entry["seconds"] = {arm: float(np.mean([r["seconds"] for r in runs])) for arm, runs in arms.items()}
        out["compare"][space] = entry
    online = {space: _runs(data, "online", space) for space in ("latent", "ncp")}
    if all(online.values()):
        out["compare"]["online_ncp_vs_online_latent"] = head_to_head(online["ncp"], online["latent"], base, n)
    hack = {arm: _runs(data, f"hack-{arm}") for arm in ("unguarded", "guarded")}
    if all(hack.values()):
        entry = {}
        steps = sorted({h["step"] for r in hack["unguarded"] for h in r["curve"]})
        for arm, runs in hack.items():
            shown = [_held(r, steps, cfg.steps_per_round) for r in runs] if arm == "guarded" else runs
            entry[arm] = pooled(runs, base, n) | {
                "gold_curve": curves(_curve_runs(shown, "toy-judge"), n),
                "proxy_curve": curves(_curve_runs(shown, "toy-proxy"), n),
                "proxy_final_mean": float(np.mean([np.mean(r["proxy"]) for r in runs])),
                "rounds_run": [r["rounds_run"] for r in runs], "best_round": [r["best_round"] for r in runs],
                "stopped": [r["stopped"] for r in runs]}
        entry["guarded_vs_unguarded"] = head_to_head(hack["guarded"], hack["unguarded"], base, n)
        # gold of the guarded result against the unguarded run's best round, per seed (the peak it could keep)
        peaks = []
        for g, u in zip(hack["guarded"], hack["unguarded"]):
            rounds = [float(np.mean(h["toy-judge"])) for h in u["curve"]]
            kept = float(np.mean(_kept(g, cfg.steps_per_round)["toy-judge"]))
            peaks.append({"seed": g["spec"]["seed"], "peak": max(rounds), "peak_step": u["curve"][int(np.argmax(rounds))]["step"],
                          "last": rounds[-1], "guarded_result": kept, "rounds_run": g["rounds_run"],
                          "best_round": g["best_round"], "final_unguarded": float(np.mean(u["scores"])),
                          "final_guarded": float(np.mean(g["scores"]))})
        entry["peaks"] = peaks
        out["hack"] = entry
    return out


def _study_choice(cfg) -> str:
    """' (the toy study's choices)' when both betas are the defaults, which the toy study chose."""
    from .online import OnlineConfig

    default = OnlineConfig()
    if (cfg.latent_beta, cfg.ncp_beta) == (default.latent_beta, default.ncp_beta):
        return " (the toy study's choices)"
    return f" (the toy study chose latent {default.latent_beta:g} / NCP {default.ncp_beta:g})"


def _ci(ci, pct: bool = False) -> str:
    if pct:
        return f"[{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def write_online_report(out: Path, data: dict, cfg) -> dict:
    """report.md, summary.json and the figures (compare.png, hack.png) in `out`."""
    from ..manifest import atomic_write_text

    s = summarise(data, cfg)
    images = len(data["base"]["prompts"])
    lines = ["# On-policy rounds and the gold guard in the toy world (`ncppo toy online`)", "",
             f"Base: the shipped toy base. Every model is scored by the toy judge on the same {images} held-out images "
             f"(6 eval prompts x {cfg.eval_seeds} seeds, DDIM {cfg.sample_steps} steps, guidance {cfg.guidance}); base "
             f"mean judge score {s['base']['mean']:.3f}. Intervals: 95% two-stage bootstrap, training seeds and prompts "
             "crossed, then the images in each cell. LoRA rank "
             f"{cfg.lora_rank}, DPO, batch {cfg.batch_size}, lr {cfg.lr}, normalised beta latent {cfg.latent_beta:g} / "
             f"NCP {cfg.ncp_beta:g}{_study_choice(cfg)}.", ""]
    if s["compare"]:
        pairs = cfg.rounds * 24 * cfg.per_prompt // 2
        lines += ["## Offline pairs against on-policy rounds", "",
                  f"Equal budgets: {cfg.rounds * cfg.steps_per_round} optimizer steps and {2 * pairs} images each. "
                  f"Offline: {pairs} fixed toy pairs (renders with random flaws, judge-labelled with Bradley-Terry noise). "
                  f"On-policy: `ncppo iterate`, {cfg.rounds} rounds x {cfg.steps_per_round} steps, each sampling "
                  f"{cfg.per_prompt} candidates for each of the 24 train prompts from the current policy, labelled by "
                  f"the judge, all pairs with margin >= 0.1 (at most {cfg.max_pairs_per_prompt} per prompt), reference = "
                  f"the base. {cfg.seeds} training seeds per arm.", "",
                  "| space | arm | mean judge score [95% CI] | score - base [95% CI] | win vs base [95% CI] | s per run |",
                  "|---|---|---|---|---|---|"]
        for space, e in s["compare"].items():
            if space not in NAMES:
                continue
            for arm in ("offline", "online"):
                p = e[arm]
                lines.append(f"| {NAMES[space]} | {arm} | {p['mean']:.3f} {_ci(p['mean_ci'])} | {p['diff_vs_base']:+.3f} "
                             f"{_ci(p['diff_vs_base_ci'])} | {100 * p['win_vs_base']:.1f}% {_ci(p['win_vs_base_ci'], True)} "
                             f"| {e['seconds'][arm]:.0f} |")
        lines += [""]
        for space, e in s["compare"].items():
            if space in NAMES and e.get("online_vs_offline"):
                h = e["online_vs_offline"]
                lines.append(f"- {NAMES[space]}, on-policy vs offline, head to head: **{100 * h['win_rate']:.1f}%** "
                             f"{_ci(h['ci'], True)}, mean score difference {h['mean_diff']:+.3f} {_ci(h['mean_diff_ci'])} "
                             f"({h['seeds']} seeds x {images} images; per seed: "
                             + ", ".join(f"{100 * x['win_rate']:.0f}%" for x in h["per_seed"]) + ").")
        h = s["compare"].get("online_ncp_vs_online_latent")
        if h:
            lines.append(f"- On-policy NCP-DPO vs on-policy latent-DPO: {100 * h['win_rate']:.1f}% {_ci(h['ci'], True)}.")
        lines += ["", "![held-out judge score over steps](compare.png)", ""]
    if s["hack"]:
        hk = s["hack"]
        u, g = hk["unguarded"], hk["guarded"]
        lines += ["## Reward hacking and the gold guard", "",
                  f"`iterate` in {NAMES[cfg.hack_space]}, labelled by `toy-proxy` (the judge plus up to 3 points for shapes "
                  f"bigger than the right size: a reward model with a blind spot), gold = the judge, {cfg.hack_rounds} rounds "
                  f"x {cfg.steps_per_round} steps, {cfg.seeds} seeds; guarded runs add `--stop-on-gold-drop "
                  f"{cfg.gold_drop:g}` and keep the best round in best/.", "",
                  "Unguarded, mean over seeds by round (step; 95% band over seeds, same curve images):", "",
                  "| step | proxy (toy-proxy) | gold (toy-judge) |", "|---|---|---|"]
        for pc, gc in zip(u["proxy_curve"], u["gold_curve"]):
            band = lambda c: f" [{c['low']:.3f}, {c['high']:.3f}]" if c.get("low") is not None else ""  # noqa: E731
            lines.append(f"| {pc['step']} | {pc['mean']:.3f}{band(pc)} | {gc['mean']:.3f}{band(gc)} |")
        lines += ["", f"- Unguarded: proxy {u['proxy_curve'][0]['mean']:.3f} at step 0 -> "
                      f"{u['proxy_curve'][-1]['mean']:.3f} at the end; gold peaks at "
                      f"{np.mean([p['peak'] for p in hk['peaks']]):.3f} (seed mean of each seed's best round) and ends at "
                      f"{np.mean([p['last'] for p in hk['peaks']]):.3f}.",
                  f"- Guarded: rounds run per seed {g['rounds_run']}, best round {g['best_round']}; the result's gold "
                  f"{np.mean([p['guarded_result'] for p in hk['peaks']]):.3f} (seed mean) against the unguarded "
                  f"peak {np.mean([p['peak'] for p in hk['peaks']]):.3f}.",
                  f"- Final held-out images, judge: unguarded {u['mean']:.3f} {_ci(u['mean_ci'])}, guarded "
                  f"{g['mean']:.3f} {_ci(g['mean_ci'])}; guarded vs unguarded head to head "
                  f"**{100 * hk['guarded_vs_unguarded']['win_rate']:.1f}%** {_ci(hk['guarded_vs_unguarded']['ci'], True)}. "
                  f"Proxy on the same images: unguarded {u['proxy_final_mean']:.3f}, guarded {g['proxy_final_mean']:.3f}.",
                  "", "Per seed (gold on the curve images; final = the 96 held-out images of the final comparison):", "",
                  "| seed | unguarded gold: peak (step) -> last | guarded: rounds run, kept round | gold kept (curve) "
                  "| final judge unguarded / guarded |", "|---|---|---|---|---|"]
        lines += [f"| {p['seed']} | {p['peak']:.3f} ({p['peak_step']}) -> {p['last']:.3f} | {p['rounds_run']}, "
                  f"{'base' if p['best_round'] in (None, 'base') else p['best_round']} | {p['guarded_result']:.3f} "
                  f"| {p['final_unguarded']:.3f} / {p['final_guarded']:.3f} |" for p in hk["peaks"]]
        lines += ["", "The guard picks the best round on the curve images, so the kept round's curve score is biased "
                      "upwards; the final held-out images are the unbiased comparison. In the figure a stopped guarded "
                      "run holds its kept round's scores after the stop.", "",
                  "![proxy and gold over rounds](hack.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "summary.json", json.dumps(s, indent=2) + "\n")
    _figures(out, s)
    return s


def _figures(out: Path, s: dict) -> None:
    from ..plots import Panel, multi_panel

    def pts(curve):
        return [(c["step"], c["mean"], c.get("low"), c.get("high")) for c in curve]

    if s["compare"]:
        series = {f"{NAMES[space]} {arm}": pts(e[arm]["curve"]) for space, e in s["compare"].items() if space in NAMES
                  for arm in ("offline", "online")}
        multi_panel(out / "compare.png", [Panel(series, ylabel="mean judge score (held-out)", hline=s["base"]["mean"],
                                                hline_label="base")],
                    xlabel="optimizer step", title="offline pairs vs on-policy rounds (95% band over training seeds)")
    if s["hack"]:
        hk = s["hack"]
        panels = [Panel({"unguarded": pts(hk["unguarded"]["proxy_curve"]), "guarded": pts(hk["guarded"]["proxy_curve"])},
                        ylabel="proxy (toy-proxy)"),
                  Panel({"unguarded": pts(hk["unguarded"]["gold_curve"]), "guarded": pts(hk["guarded"]["gold_curve"])},
                        ylabel="gold (toy judge)", hline=s["base"]["mean"], hline_label="base")]
        multi_panel(out / "hack.png", panels, xlabel="optimizer step (rounds end)",
                    title="proxy up, gold down; the guard keeps its best round (95% band over seeds)")
