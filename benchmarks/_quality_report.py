"""Aggregation and output of the selection-quality benchmark: Markdown tables, JSON, PNG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._method_runs import METRICS, MethodSpec
from benchmarks._score_probes import MODES


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of finite values."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": int(len(v))}


def aggregate_methods(runs: Sequence[Mapping[str, Any]], specs: Sequence[MethodSpec]
                      ) -> dict[str, dict[str, Any]]:
    """Per method: mean ± std over seeds of every metric, of the selection statistics and the
    wall time, and the per-seed paired difference to "no generated data" and to accept-all."""
    by = {(r["method"], r["seed"]): r for r in runs}
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        mine = sorted((r for r in runs if r["method"] == spec.name), key=lambda r: r["seed"])
        if not mine:
            continue
        entry: dict[str, Any] = {"label": spec.label, "seeds": [r["seed"] for r in mine]}
        for kind in ("segm", "bbox"):
            for m in METRICS:
                entry[f"{kind}_{m}"] = mean_std([r["metrics"][kind][m] for r in mine])
                for ref in ("none", "accept_all"):
                    paired = [r["metrics"][kind][m] - by[(ref, r["seed"])]["metrics"][kind][m]
                              for r in mine if (ref, r["seed"]) in by]
                    entry[f"{kind}_{m}_minus_{ref}"] = mean_std(paired)
        for key in ("wall_s", "s_per_step"):
            entry[key] = mean_std([r[key] for r in mine])
        if all("selection" in r for r in mine):
            for key in ("precision", "recall", "accepted_fraction", "good_fraction"):
                entry[key] = mean_std([r["selection"][key] for r in mine])
            entry["batch_acceptance"] = mean_std([r["batches"]["acceptance_rate"] for r in mine])
            entry["candidates_per_step"] = mean_std(
                [r["batches"]["candidates_per_step"] for r in mine])
            entry["invalid_steps"] = int(sum(r["batches"]["invalid"] for r in mine))
            entry["by_kind"] = {
                kind: {stat: mean_std([r["selection"]["by_kind"][kind][stat] for r in mine])
                       for stat in ("accepted_fraction", "score_auc")}
                for kind in mine[0]["selection"]["by_kind"]}
        if any("random_p" in r for r in mine):
            entry["random_p"] = [r.get("random_p") for r in mine]
        out[spec.name] = entry
    return out


def _pm(stat: Mapping[str, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if not stat or not math.isfinite(stat["mean"]):
        return "–"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _signed(stat: Mapping[str, float] | None, scale: float = 100.0) -> str:
    if not stat or not math.isfinite(stat["mean"]):
        return "–"
    return f"{scale * stat['mean']:+.1f} ± {scale * stat['std']:.1f}"


def methods_markdown(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The two method tables: AP metrics, then selection statistics and cost."""
    seeds = next(iter(summary.values()))["seeds"] if summary else []
    lines = [f"LVIS metrics ×100 on the validation split, mean ± std over seeds {seeds}:", "",
             "| method | segm AP | segm APr | segm APc | segm APf | bbox AP | bbox APr | bbox APc "
             "| bbox APf |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in summary.values():
        cells = [_pm(entry[f"{k}_{m}"]) for k in ("segm", "bbox") for m in METRICS]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (same seed, same pretrained start), ×100, mean ± std; "
              "selection against the generator's truth; cost of the fine-tuning steps:", "",
              "| method | Δ segm AP vs none | Δ segm APr vs none | Δ segm APr vs accept-all | "
              "batches accepted | candidates accepted | precision | recall | s/step | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in summary.values():
        cells = [_signed(entry["segm_AP_minus_none"]), _signed(entry["segm_APr_minus_none"]),
                 _signed(entry["segm_APr_minus_accept_all"]),
                 _pm(entry.get("batch_acceptance"), 100, 0) + ("" if "batch_acceptance" not in
                                                               entry else " %"),
                 _pm(entry.get("accepted_fraction"), 100, 0) + ("" if "accepted_fraction" not in
                                                                entry else " %"),
                 _pm(entry.get("precision"), 100, 0) + ("" if "precision" not in entry else " %"),
                 _pm(entry.get("recall"), 100, 0) + ("" if "recall" not in entry else " %"),
                 _pm(entry["s_per_step"], 1, 3), _pm(entry["wall_s"], 1, 0)]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kinds_markdown(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """Acceptance per failure kind of the generator, and the ROC AUC of each method's decision
    score between good candidates and each kind (candidates that got a score)."""
    entries = [e for e in summary.values() if "by_kind" in e]
    if not entries:
        return ""
    kinds = list(entries[0]["by_kind"])
    failed = [k for k in kinds if k != "none"]
    lines = ["| method | " + " | ".join(f"{k} accepted" for k in kinds) + " | "
             + " | ".join(f"AUC good vs {k}" for k in failed) + " |",
             "|---|" + "---|" * (len(kinds) + len(failed))]
    for e in entries:
        acc = [_pm(e["by_kind"][k]["accepted_fraction"], 100, 0) + " %" for k in kinds]
        aucs = []
        for k in failed:
            stat = e["by_kind"][k]["score_auc"]
            aucs.append("–" if not math.isfinite(stat["mean"]) else
                        f"{stat['mean']:.2f} ± {stat['std']:.2f}")
        lines.append(f"| {e['label']} | " + " | ".join(acc + aucs) + " |")
    return "\n".join(lines)


def noise_markdown(noise: Mapping[str, Any]) -> str:
    """Score and acceptance per noise level, for each mode."""
    modes = [m for m in MODES if m in noise]
    lines = ["| mode | noise σ (×255) | batches | median score [10 %, 90 %] | paired change vs "
             "σ = 0 (mean) | batches scored lower than at σ = 0 | accepted, fixed −0.05 | "
             "accepted, dynamic |", "|---|---|---|---|---|---|---|---|"]
    for m in modes:
        for level, v in noise[m].items():
            lower = ("–" if float(level) == 0.0 else f"{100 * v['paired_lower_fraction']:.0f} %")
            change = "–" if float(level) == 0.0 else f"{v['paired_change_mean']:+.3f}"
            lines.append(f"| {m} | {float(level):g} | {v['n']} | {v['median']:+.3f} "
                         f"[{v['q10']:+.3f}, {v['q90']:+.3f}] | {change} | {lower} | "
                         f"{100 * v['accept_fixed']:.0f} % | {100 * v['accept_dynamic']:.0f} % |")
    return "\n".join(lines)


def fidelity_markdown(fidelity: Mapping[str, Any]) -> str:
    """Rank correlation and sign agreement of the first-order scores with the exact gain."""
    pooled = fidelity["pooled"]
    lines = [f"{pooled['n']} pasted batches (seeds pooled), at the pretrained weights:", "",
             "| score | look-ahead step α | Spearman ρ (score, exact gain) | sign agreement | "
             "fixed −0.05 vs gain ≥ 0 | batches with gain ≥ 0 |",
             "|---|---|---|---|---|---|"]
    for alpha in fidelity["alphas"]:
        block = pooled[str(alpha)]
        for mode in MODES:
            v = block[mode]
            lines.append(f"| {mode} | {alpha:g} | {v['spearman']:+.2f} | "
                         f"{100 * v['sign_agreement']:.0f} % | "
                         f"{100 * v['fixed_decision_agreement']:.0f} % | "
                         f"{100 * block['gain_positive']:.0f} % |")
    lines += ["", "Share of these batches accepted at −0.05: " + ", ".join(
              f"{mode} {100 * pooled[f'{mode}_accept_fixed']:.0f} %" for mode in MODES)
              + ". Spearman ρ with the batch's fraction of good candidates (does the number see "
              "the generator's failures?): "
              + ", ".join([f"{mode} score {pooled[f'{mode}_vs_good_fraction']:+.2f}"
                           for mode in MODES]
                          + [f"exact gain (α={a:g}) {pooled[str(a)]['gain_vs_good_fraction']:+.2f}"
                             for a in fidelity["alphas"]]) + "."]
    return "\n".join(lines)


def plot_noise(noise: Mapping[str, Any], path: str | Path) -> None:
    """Violin plots of the score per noise level, one panel per mode, fixed threshold drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in noise]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        levels = list(noise[mode])
        data = [noise[mode][lv]["scores"] for lv in levels]
        ax.violinplot(data, showmedians=True)
        ax.axhline(-0.05, color="tab:red", lw=1, ls="--", label="fixed threshold −0.05")
        ax.set_xticks(range(1, len(levels) + 1), [f"{float(lv):g}" for lv in levels])
        ax.set_xlabel("object noise σ (×255)")
        ax.set_ylabel("BSGAL score (cosine)")
        fixed = ", ".join(f"{100 * noise[mode][lv]['accept_fixed']:.0f}" for lv in levels)
        dynamic = ", ".join(f"{100 * noise[mode][lv]['accept_dynamic']:.0f}" for lv in levels)
        ax.set_title(f"{mode} mode; accepted (%) per level\nfixed −0.05: {fixed}; "
                     f"dynamic: {dynamic}", fontsize=8)
        ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
