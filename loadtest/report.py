"""`fleetserve report RESULT.json`: PNG charts (matplotlib) of benchmark results — latency percentiles with the
mean beside them over time, policy comparisons, autoscaling timelines — for docs/benchmarks/.

Shapes read (docs/observability.md, "Bench report plots"): {"kind": "latency_timeline" | "policy_comparison" |
"autoscale_timeline", ...}; a list of records with "policy" (docs/benchmarks/routing_policies.json); and bench
summaries ({"runs": [{"direct": summary, "mesh": summary, ...}]} or one summary) with ttft_ms/tpot_ms
percentiles."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

PERCENTILES = ("p50", "p95", "p99")
COLORS = {"p50": "#4f7cd8", "p95": "#e69b00", "p99": "#d05050", "mean": "#222222"}


class ReportError(ValueError):
    """The file is not a result this command can draw (the message says what it expected)."""


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _latency_axes(ax, ts: list[float], series: list[dict], key: str, title: str) -> None:
    for q in (*PERCENTILES, "mean"):
        ys = [(p.get(key) or {}).get(q) for p in series]
        if any(y is not None for y in ys):
            ax.plot(
                ts,
                [float("nan") if y is None else y for y in ys],
                label=q,
                color=COLORS[q],
                linestyle="--" if q == "mean" else "-",
                linewidth=2 if q == "p99" else 1.4,
            )
    ax.set_title(title)
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)
    else:  # the records carry no such latency (e.g. no ITL): say so rather than draw an empty legend
        ax.text(0.5, 0.5, f"no {key} samples", transform=ax.transAxes, ha="center", va="center")


def latency_timeline(doc: dict, out: Path, stem: str) -> list[Path]:
    series = doc.get("series") or []
    if not series:
        raise ReportError(
            "latency_timeline needs a non-empty 'series' of {t_s, ttft_ms: {p50,p95,p99,mean}, ...}"
        )
    ts = [float(p["t_s"]) for p in series]
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    _latency_axes(axes[0], ts, series, "ttft_ms", "Time to first token: percentiles and the mean")
    _latency_axes(axes[1], ts, series, "tpot_ms", "Time per output token: percentiles and the mean")
    axes[1].set_xlabel("seconds")
    fig.suptitle(doc.get("title", stem))
    return [_save(fig, out / f"{stem}-latency.png")]


def _bars(ax, names: list[str], stats: list[dict], title: str) -> None:
    width = 0.8 / len(PERCENTILES)
    for i, q in enumerate(PERCENTILES):
        ax.bar(
            [x + i * width for x in range(len(names))],
            [s.get(q) or 0.0 for s in stats],
            width,
            label=q,
            color=COLORS[q],
        )
    means = [s.get("mean") for s in stats]
    if any(m is not None for m in means):
        ax.scatter(
            [x + width for x in range(len(names))],
            [m if m is not None else float("nan") for m in means],
            marker="D",
            color=COLORS["mean"],
            zorder=3,
            label="mean",
        )
    ax.set_xticks([x + width for x in range(len(names))], names, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel("ms")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _comparison(
    title: str, names: list[str], ttft: list[dict], tpot: list[dict], tput: list[float | None], out: Path
) -> Path:
    panels = 2 + any(t is not None for t in tput)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.5))
    _bars(axes[0], names, ttft, "TTFT")
    _bars(axes[1], names, tpot, "TPOT")
    if panels == 3:
        axes[2].bar(names, [t or 0.0 for t in tput], color="#2b9348")
        axes[2].set_title("output tokens/s")
        axes[2].tick_params(axis="x", rotation=20)
        axes[2].grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, out)


def policy_comparison(doc: dict, out: Path, stem: str) -> list[Path]:
    policies = doc.get("policies") or {}
    if not policies:
        raise ReportError("policy_comparison needs 'policies': {name: {ttft_ms, tpot_ms, throughput_tok_s}}")
    names = list(policies)
    return [
        _comparison(
            doc.get("title", stem),
            names,
            [policies[n].get("ttft_ms", {}) for n in names],
            [policies[n].get("tpot_ms", {}) for n in names],
            [policies[n].get("throughput_tok_s") for n in names],
            out / f"{stem}-policies.png",
        )
    ]


def policy_records(records: list[dict], out: Path, stem: str) -> list[Path]:
    """docs/benchmarks/routing_policies.json: records {policy, workload, ttft_p50_ms, ...}, one chart per
    workload."""
    paths = []
    for workload in dict.fromkeys(r.get("workload", "") for r in records):
        rows = [r for r in records if r.get("workload", "") == workload]

        def stats(r: dict, metric: str) -> dict:
            return {q: r.get(f"{metric}_{q}_ms") for q in (*PERCENTILES, "mean")}

        paths.append(
            _comparison(
                f"{stem}: {workload}" if workload else stem,
                [r["policy"] for r in rows],
                [stats(r, "ttft") for r in rows],
                [stats(r, "tpot") for r in rows],
                [r.get("output_tokens_per_s") for r in rows],
                out / f"{stem}-{workload or 'all'}.png",
            )
        )
    return paths


def autoscale_timeline(doc: dict, out: Path, stem: str) -> list[Path]:
    series = doc.get("series") or []
    if not series:
        raise ReportError("autoscale_timeline needs 'series' of {t_s, desired, actual, load, ttft_p99_ms?}")
    ts = [float(p["t_s"]) for p in series]
    has_p99 = any(p.get("ttft_p99_ms") is not None for p in series)
    fig, axes = plt.subplots(
        2 if has_p99 else 1, 1, figsize=(10, 6.5 if has_p99 else 4), sharex=True, squeeze=False
    )
    ax = axes[0][0]
    ax.step(
        ts, [p.get("desired") for p in series], where="post", label="desired", color="#7b2cbf", linestyle="--"
    )
    ax.step(ts, [p.get("actual") for p in series], where="post", label="actual", color="#2b9348", linewidth=2)
    ax.set_ylabel("replicas")
    ax.grid(alpha=0.3)
    load = [p.get("load") for p in series]
    if any(v is not None for v in load):
        twin = ax.twinx()
        twin.plot(ts, load, color="#999999", linewidth=1, label="load")
        twin.set_ylabel(doc.get("load_unit", "load"))
    for ev in doc.get("events") or []:
        for row in axes:
            row[0].axvline(float(ev["t_s"]), color="#cc8800", alpha=0.5, linewidth=1)
        ax.annotate(
            str(ev.get("what", "")),
            (float(ev["t_s"]), ax.get_ylim()[1]),
            fontsize=7,
            rotation=90,
            va="top",
            ha="right",
        )
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(doc.get("title", stem))
    if has_p99:
        bottom = axes[1][0]
        bottom.plot(ts, [p.get("ttft_p99_ms") for p in series], color=COLORS["p99"], label="TTFT p99")
        bottom.set_ylabel("ms")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=8)
    axes[-1][0].set_xlabel("seconds")
    return [_save(fig, out / f"{stem}-autoscale.png")]


def bench_runs(doc: dict, out: Path, stem: str) -> list[Path]:
    """`fleetserve bench` output: each run's summaries (direct, mesh, ...) side by side."""
    runs = doc.get("runs") if isinstance(doc.get("runs"), list) else [doc]
    paths = []
    for i, run in enumerate(runs):
        summaries = {k: v for k, v in _summaries(run).items()}
        if not summaries:
            continue
        names = list(summaries)
        paths.append(
            _comparison(
                run.get("command", f"{stem} run {i + 1}"),
                names,
                [summaries[n].get("ttft_ms", {}) for n in names],
                [summaries[n].get("tpot_ms", {}) for n in names],
                [summaries[n].get("output_tokens_per_s") for n in names],
                out / f"{stem}-run{i + 1}.png",
            )
        )
    if not paths:
        raise ReportError("no bench summaries (objects with ttft_ms percentiles) found")
    return paths


def _summaries(run: Any, prefix: str = "") -> dict[str, dict]:
    """Every object with a ttft_ms percentile dict in run, by its path of keys."""
    if not isinstance(run, dict):
        return {}
    if isinstance(run.get("ttft_ms"), dict):
        return {prefix or run.get("mode", "run"): run}
    out: dict[str, dict] = {}
    for k, v in run.items():
        out.update(_summaries(v, f"{prefix}.{k}" if prefix else k))
    return out


KINDS: dict[str, Callable[[dict, Path, str], list[Path]]] = {
    "latency_timeline": latency_timeline,
    "policy_comparison": policy_comparison,
    "autoscale_timeline": autoscale_timeline,
}


def render(path: Path, out_dir: Path | None = None) -> list[Path]:
    """The PNGs drawn from one result file (written beside it, or into out_dir)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: {e}") from None
    out = out_dir or path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    if isinstance(doc, list) and doc and all(isinstance(r, dict) and "policy" in r for r in doc):
        return policy_records(doc, out, stem)
    if not isinstance(doc, dict):
        raise ReportError(f"{path}: expected a JSON object (or a list of policy records)")
    kind = doc.get("kind")
    if kind is not None:
        if kind not in KINDS:
            raise ReportError(f"{path}: unknown kind {kind!r}; known: {', '.join(KINDS)}")
        return KINDS[kind](doc, out, stem)
    return bench_runs(doc, out, stem)
