"""Outputs of a simulation: terminal summary, the ``--json`` object, CSV time series, an HTML report.

The HTML report is one self-contained file (plots embedded as base64 PNG) so it can be mailed or
attached to an issue. Plots: power vs budget per domain, ready replicas per pool, TTFT/TPOT p99,
routing share to fallbacks — one figure per policy set, the comparison table on top.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from wattplane.simulate.engine import SimResult

# design §6 names first, then the others
HEADLINE = ("slo_attainment", "cost_per_hour", "energy_kwh", "tokens_per_joule", "over_budget_s", "migrations",
            "expert_copies", "fallback_share", "solver_ms_p99")
EXTRA = ("quality", "cost_per_million_tokens", "caps_applied", "ttft_p99_ms", "tpot_p99_ms", "replica_changes",
         "dropped_share", "policy_fallback_share", "guard_node_s")


def to_json(scenario: str, seed: int, step_s: float, duration_s: float, results: list[SimResult]) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "seed": seed,
        "duration_s": duration_s,
        "step_s": step_s,
        "policy_sets": {
            r.policy_set: {
                "methods": r.methods,
                "metrics": {k: _num(v) for k, v in r.metrics.items()},
                "deployments": {d: {k: _num(v) for k, v in m.items()} for d, m in r.per_deployment.items()},
                "unavailable": r.unavailable,
                "invariant_violations": r.invariant_violations[:20],
            }
            for r in results
        },
    }


def _num(x: float) -> float:
    return round(float(x), 6) if np.isfinite(x) else float("nan")


def summary(scenario: str, results: list[SimResult], wall_s: float) -> str:
    names = [r.policy_set for r in results]
    keys = [*HEADLINE, *EXTRA]
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"scenario {scenario}: {len(results)} policy set(s), {wall_s:.1f} s wall", ""]
    lines.append("metric".ljust(26) + "".join(n.rjust(width) for n in names))
    for k in keys:
        lines.append(k.ljust(26) + "".join(_fmt(r.metrics.get(k)).rjust(width) for r in results))
    for r in results:
        lines.append("")
        lines.append(f"{r.policy_set}: " + ", ".join(f"{s}={m}" for s, m in r.methods.items()))
        for d, m in r.per_deployment.items():
            lines.append(f"  {d:<24} SLO {m['slo_attainment']:.3f}  TTFT p99 {_fmt(m['ttft_p99_ms'])} ms  "
                         f"TPOT p99 {_fmt(m['tpot_p99_ms'])} ms")
        if r.unavailable:
            lines.append(f"  not yet available (stage skipped): {', '.join(r.unavailable)}")
        if r.invariant_violations:
            lines.append(f"  INVARIANT VIOLATIONS: {len(r.invariant_violations)}; first: {r.invariant_violations[0]}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def write_csv(out: Path, result: SimResult, step_s: float) -> Path:
    """One row per step: time, then every series column (``name[label]``)."""
    path = out / f"timeseries-{result.policy_set}.csv"
    cols: list[tuple[str, np.ndarray]] = []
    for name, arr in result.series.items():
        if name == "budget_w":
            continue
        if arr.ndim == 1:
            cols.append((name, arr))
        else:
            labels = result.series_labels.get(name, [str(i) for i in range(arr.shape[0])])
            cols.extend((f"{name}[{lab}]", arr[i]) for i, lab in enumerate(labels))
    steps = len(result.series["capped_gpus"])
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["t_s", *(c for c, _ in cols)])
        for s in range(steps):
            w.writerow([f"{s * step_s:g}", *(f"{float(a[s]):.6g}" for _, a in cols)])
    return path


def write_cycles(out: Path, result: SimResult) -> Path:
    path = out / f"cycles-{result.policy_set}.jsonl"
    with path.open("w") as fh:
        for c in result.cycles:
            fh.write(json.dumps(c) + "\n")
    return path


def write_html(out: Path, scenario: str, description: str, results: list[SimResult], step_s: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>wattplane simulate: {html.escape(scenario)}"
             "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child,td:first-child"
             "{text-align:left}</style></head><body>",
             f"<h1>wattplane simulate: {html.escape(scenario)}</h1><p>{html.escape(description)}</p>",
             "<h2>Summary</h2><table><tr><th>metric</th>"
             + "".join(f"<th>{html.escape(r.policy_set)}</th>" for r in results) + "</tr>"]
    for k in (*HEADLINE, *EXTRA):
        parts.append(f"<tr><td>{k}</td>" + "".join(f"<td>{_fmt(r.metrics.get(k))}</td>" for r in results) + "</tr>")
    parts.append("</table>")
    for r in results:
        parts.append(f"<h2>{html.escape(r.policy_set)}</h2><p>"
                     + html.escape(", ".join(f"{s}={m}" for s, m in r.methods.items())) + "</p>")
        if r.unavailable:
            parts.append(f"<p>Stages not yet available (skipped): {html.escape(', '.join(r.unavailable))}</p>")
        parts.append("<table><tr><th>deployment</th><th>SLO attainment</th><th>TTFT p99 ms</th><th>TPOT p99 ms</th>"
                     "<th>requests</th></tr>")
        for d, m in r.per_deployment.items():
            parts.append(f"<tr><td>{html.escape(d)}</td><td>{m['slo_attainment']:.3f}</td>"
                         f"<td>{_fmt(m['ttft_p99_ms'])}</td><td>{_fmt(m['tpot_p99_ms'])}</td>"
                         f"<td>{_fmt(m['requests'])}</td></tr>")
        parts.append("</table>")
        t = np.arange(len(r.series["capped_gpus"])) * step_s / 60.0
        fig, axes = plt.subplots(2, 2, figsize=(12, 7))
        ax = axes[0][0]
        for i, lab in enumerate(r.series_labels.get("power_w", [])):
            line = ax.plot(t, r.series["power_w"][i] / 1000, label=f"{lab}")[0]
            ax.axhline(r.series["budget_w"][i] / 1000, color=line.get_color(), linestyle="--", linewidth=1)
        if not r.series_labels.get("power_w"):
            ax.plot(t, r.series["fleet_power_w"] / 1000, label="fleet")
        ax.set_title("power vs budget (kW; dashed = budget)")
        _legend(ax)
        ax = axes[0][1]
        for i, lab in enumerate(r.series_labels["ready_replicas"]):
            if r.series["ready_replicas"][i].any():
                ax.step(t, r.series["ready_replicas"][i], where="post", label=lab)
        ax.set_title("ready replicas per deployment@pool")
        _legend(ax)
        ax = axes[1][0]
        for i, lab in enumerate(r.series_labels["ttft_p99_ms"]):
            ax.plot(t, np.minimum(r.series["ttft_p99_ms"][i], 1e5), label=f"{lab} TTFT")
            ax.plot(t, np.minimum(r.series["tpot_p99_ms"][i], 1e5), linestyle=":", label=f"{lab} TPOT")
        ax.set_yscale("log")
        ax.set_title("latency p99 (ms)")
        _legend(ax)
        ax = axes[1][1]
        for i, lab in enumerate(r.series_labels["fallback_share"]):
            if r.series["fallback_share"][i].any():
                ax.plot(t, r.series["fallback_share"][i], label=lab)
        ax.set_ylim(0, 1)
        ax.set_title("share routed to fallback")
        _legend(ax)
        for a in axes.flat:
            a.set_xlabel("minutes")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        parts.append(f"<img alt='plots' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


__all__ = ["EXTRA", "HEADLINE", "summary", "to_json", "write_csv", "write_cycles", "write_html"]
