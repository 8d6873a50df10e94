"""The capstone demo's report: plots (matplotlib) of the run's record and one self-contained HTML page (the plots
inlined), plus a screenshot of it by headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np


def _windows(requests: list[dict], key: str, width_s: float, end_s: float) -> list[dict]:
    """Per window of request start time: count, mean, p50 and p99 of `key` over the successful requests."""
    out = []
    for i in range(int(end_s / width_s) + 1):
        lo, hi = i * width_s, (i + 1) * width_s
        vals = [
            r[key] for r in requests if r["status"] == "ok" and r.get(key) is not None and lo <= r["t_s"] < hi
        ]
        if vals:
            a = np.asarray(vals, dtype=float)
            out.append(
                {
                    "t_s": lo + width_s / 2,
                    "n": len(vals),
                    "mean": float(a.mean()),
                    "p50": float(np.percentile(a, 50)),
                    "p99": float(np.percentile(a, 99)),
                }
            )
    return out


def _events(ax, record: dict) -> None:
    s = record["settings"]
    for e in record["events"]:
        if e.get("kind") == "kill":
            ax.axvline(e["t_s"], color="red", lw=1.2, ls="--")
        elif "spike" in e["what"]:
            ax.axvspan(e["t_s"], e["t_s"] + s["day_s"] / 24, color="orange", alpha=0.15)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def plots(record: dict) -> dict[str, bytes]:
    """Name -> PNG bytes: load, replicas, latency, cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, reqs, samples = record["settings"], record["requests"], record["samples"]
    end = s["day_s"] * s["days"]
    out: dict[str, bytes] = {}
    width = max(1.0, s["day_s"] / 48)

    fig, ax = plt.subplots(figsize=(10, 3))
    t = [p["t_s"] for p in samples]
    ax.plot(t, [p["rate"] for p in samples], label="offered req/s (the day's shape)")
    done = np.histogram([r["t_s"] for r in reqs], bins=np.arange(0, end + width, width))[0] / width
    ax.step(np.arange(0, end, width)[: len(done)], done, where="post", label="requests sent/s")
    ax.plot(t, [p["in_flight"] for p in samples], label="in flight", alpha=0.7)
    _events(ax, record)
    ax.set_xlabel("s (orange: the spike, red: replica SIGKILLed)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Load")
    fig.tight_layout()
    out["load"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3))
    pts = [p for p in samples if "desired" in p]
    ax.step([p["t_s"] for p in pts], [p["desired"] for p in pts], where="post", label="desired (autoscaler)")
    ax.step([p["t_s"] for p in pts], [p["serving"] for p in pts], where="post", label="serving (registry)")
    ax.step(
        [p["t_s"] for p in pts],
        [p["serving"] + p.get("starting", 0) for p in pts],
        where="post",
        label="serving + starting",
        ls=":",
    )
    rt = [p for p in samples if "routable" in p]
    ax.step(
        [p["t_s"] for p in rt],
        [p["routable"].get("sim-1b", 0) for p in rt],
        where="post",
        label="routable (router)",
        alpha=0.6,
    )
    _events(ax, record)
    ax.set_ylabel("sim-1b replicas")
    ax.set_xlabel("s")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Replicas: desired vs actual")
    fig.tight_layout()
    out["replicas"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        w = _windows(reqs, key, width * 2, end)
        x = [p["t_s"] for p in w]
        for stat in ("mean", "p50", "p99"):
            ax.plot(x, [p[stat] for p in w], label=stat, lw=2 if stat != "p50" else 1)
        _events(ax, record)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_xlabel("s")
        ax.set_title(f"{title}: p50 and p99 beside the mean")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out["latency"] = _png(fig)
    plt.close(fig)

    series = record["sections"].get("cost_series", {}).get("series", [])
    if series:
        fig, ax = plt.subplots(figsize=(10, 2.8))
        ax.plot([p["t_s"] for p in series], [p["cost_per_1k_tokens_usd"] * 1000 for p in series], marker="o")
        _events(ax, record)
        ax.set_ylabel("milli-USD per 1k tokens")
        ax.set_xlabel("s")
        ax.set_title("Cost per 1k tokens (GPU time x price, idle time included)")
        fig.tight_layout()
        out["cost"] = _png(fig)
        plt.close(fig)
    return out


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _skipped(section: dict) -> str:
    return (
        f'<p class="skipped">skipped: {html.escape(section["skipped"])}</p>' if "skipped" in section else ""
    )


def tenant_rows(record: dict) -> list[dict]:
    rows = []
    retries = record["sections"].get("resilience", {}).get("client_retries") or {}
    for tenant in sorted({r["tenant"] for r in record["requests"]}):
        mine = [r for r in record["requests"] if r["tenant"] == tenant]
        rows.append(
            {
                "tenant": tenant,
                "requests": len(mine),
                "ok": sum(r["status"] == "ok" for r in mine),
                "limited (after honouring RetryInfo)": sum(r["status"] == "limited" for r in mine),
                "failed": sum(r["status"] == "failed" for r in mine),
                "client retries": retries.get(tenant, ""),
            }
        )
    return rows


def routing_rows(record: dict) -> list[dict]:
    rows = []
    for kind in ("chat", "easy", "hard"):
        mine = [r for r in record["requests"] if r["kind"] == kind and r["status"] == "ok"]
        if not mine:
            continue
        prompt = sum(r["prompt_tokens"] for r in mine)
        rows.append(
            {
                "request type": kind,
                "served": len(mine),
                "by sim-1b": sum(r["model"] == "sim-1b" for r in mine),
                "by sim-8b": sum(r["model"] == "sim-8b" for r in mine),
                "prefix-cache hits (prompt tokens)": f"{sum(r['cached_tokens'] for r in mine) / prompt:.0%}"
                if prompt
                else "",
                "TTFT p50 ms": round(float(np.percentile([r["ttft_ms"] for r in mine], 50)), 1),
            }
        )
    return rows


def cost_rows(record: dict) -> list[dict]:
    rows = []
    for b in record["sections"].get("cost", {}).get("breakdowns", []):
        dim = b.get("dimension", "").removeprefix("COST_DIMENSION_").lower()
        for line in b.get("lines", []):
            rows.append(
                {
                    "by": dim,
                    "key": line.get("key"),
                    "USD": f"{line.get('cost_usd', 0):.5f}",
                    "share": f"{line.get('share', 0):.0%}",
                    "requests": line.get("requests", 0),
                    "per 1k tokens": f"{line.get('cost_per_1k_tokens', 0):.5f}",
                }
            )
    return rows


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1240px;color:#222}
h1{margin-bottom:4px} .sub{color:#666;margin-top:0}
.verdicts{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.v{padding:10px 14px;border-radius:6px;font-weight:600}
.ok{background:#e3f6e5;color:#135c1c}.bad{background:#fde4e1;color:#8a1c0f}.skip{background:#eee;color:#555}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}
th{background:#f4f4f4} img{max-width:100%} .skipped{color:#777;font-style:italic}
"""


def render_html(record: dict, pngs: dict[str, bytes]) -> str:
    v, s, sec = record["verdicts"], record["settings"], record["sections"]
    res = sec.get("resilience", {})
    kill = next((e for e in record["events"] if e.get("kind") == "kill"), None)

    def badge(ok: bool | None, text: str) -> str:
        cls = "skip" if ok is None else ("ok" if ok else "bad")
        return f'<div class="v {cls}">{html.escape(text)}</div>'

    badges = [
        badge(v["zero_failed_requests"], f"{v['failed']} failed of {v['requests']} requests"),
        badge(
            v["failed_around_the_kill"] == 0 if kill else None,
            f"replica killed at {kill['t_s']} s: {v['failed_around_the_kill']} failed, "
            f"{res.get('router_resumes', 0)} streams resumed"
            if kill
            else "no replica killed",
        ),
    ]
    for slo in v["slos"]:
        badge_text = f"SLO {slo['name']}: {slo['sli']:.4f} vs {slo['objective']}"
        badges.append(badge(slo["met"], badge_text + (" met" if slo["met"] else " NOT met")))
    rollout = sec.get("rollout", {})
    badges.append(
        badge(
            None if "skipped" in rollout else rollout.get("ok"),
            "rollout: skipped" if "skipped" in rollout else "rollout",
        )
    )
    slo_rows = [{**x, "met": "yes" if x["met"] else "NO"} for x in v["slos"]]
    decisions = sec.get("scaling", {}).get("models", [{}])[0].get("decisions", [])[-12:]
    parts = [
        f"<h1>fleetserve capstone demo</h1><p class='sub'>{s['days']} compressed day(s) of {s['day_s']:g} s, "
        f"{v['requests']} requests, sim engines at {s['speed_factor']:g}x an H100; backend {s['backend']}</p>",
        f"<div class='verdicts'>{''.join(badges)}</div>",
        "<h2>Load</h2>",
        _img(pngs["load"], "load") if "load" in pngs else "",
        "<h2>Replicas desired vs actual (predictive + reactive autoscaling)</h2>",
        _img(pngs["replicas"], "replicas") if "replicas" in pngs else "",
        "<h3>Last scaling decisions</h3>",
        _table(decisions, ["at_unix", "previous", "desired", "actual", "direction", "policy", "signal"]),
        "<h2>Latency: p50 and p99 beside the mean</h2>",
        _img(pngs["latency"], "latency") if "latency" in pngs else "",
        "<h2>SLOs (the metrics service)</h2>",
        _table(
            slo_rows,
            [
                "name",
                "kind",
                "objective",
                "sli",
                "events",
                "bad_events",
                "measured_ms",
                "met",
                "alerts_firing",
            ],
        ),
        "<h2>Cost</h2>",
        _img(pngs["cost"], "cost") if "cost" in pngs else _skipped({"skipped": "no cost series"}),
        _table(cost_rows(record), ["by", "key", "USD", "share", "requests", "per 1k tokens"]),
        "<h2>Routing: cache-aware chats, model-routed questions</h2>",
        _table(
            routing_rows(record),
            [
                "request type",
                "served",
                "by sim-1b",
                "by sim-8b",
                "prefix-cache hits (prompt tokens)",
                "TTFT p50 ms",
            ],
        ),
        "<h2>Tenants and limits</h2>",
        _table(
            tenant_rows(record),
            ["tenant", "requests", "ok", "limited (after honouring RetryInfo)", "failed", "client retries"],
        ),
        "<h2>The kill and the resumes</h2>",
        f"<p>{html.escape(kill['what']) if kill else 'no replica was killed'}; the router resumed "
        f"{res.get('router_resumes', 0)} streams mid-generation on other replicas and retried "
        f"{res.get('router_retries', 0)} attempts before a first token; requests that failed within 15 s of the "
        f"kill: {v['failed_around_the_kill']}.</p>",
        "<h2>Canary rollout</h2>",
        _skipped(rollout) or html.escape(str(rollout)),
        "<h2>Events</h2>",
        _table(record["events"], ["t_s", "what"]),
    ]
    return f"<!doctype html><html><head><meta charset='utf-8'><title>fleetserve capstone demo</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"


def write(record: dict, out_dir: Path) -> Path:
    """report.json, the plots, report.html in out_dir; the HTML's path."""
    import json

    pngs = plots(record)
    for name, png in pngs.items():
        (out_dir / f"{name}.png").write_bytes(png)
    (out_dir / "report.json").write_text(json.dumps(record, indent=1) + "\n")
    page = out_dir / "report.html"
    page.write_text(render_html(record, pngs))
    return page


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 3400) -> bool:
    """A PNG of the page by headless Chromium; False when no Chromium is installed."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        return False
    subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return png.exists()
