"""The capstone demo's report: plots (matplotlib) of the run's record and one self-contained HTML page (the plots
inlined), plus a screenshot of it by headless Chromium."""

from __future__ import annotations

import base64
import html
import io
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

    rollout_png = _rollout_plot(record, width * 2)
    if rollout_png:
        out["rollout"] = rollout_png

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


VERSION_COLOURS = {"v1": "tab:blue", "v2": "tab:green", "v3": "tab:red"}


def _rollout_plot(record: dict, width: float) -> bytes | None:
    """Two panels over the canaries' span: the share of the small model's requests each version served (the
    client's view) with the registry's candidate percent, and the TPOT guardrail: the candidate's value against
    its bound (the factor times the baseline's)."""
    rs = record.get("rollout_samples") or []
    if not rs:
        return None
    import matplotlib.pyplot as plt

    end = max(p["t_s"] for p in rs) + width * 2
    reqs = [
        r for r in record["requests"] if r["status"] == "ok" and r.get("model") == "sim-1b" and r["t_s"] < end
    ]
    edges = np.arange(0, end + width, width)
    versions = sorted({r.get("version") or "?" for r in reqs})
    counts = {
        v: np.histogram([r["t_s"] for r in reqs if (r.get("version") or "?") == v], bins=edges)[0]
        for v in versions
    }
    total = np.maximum(1, sum(counts.values()))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.4))
    a.stackplot(
        edges[:-1] + width / 2,
        [100 * counts[v] / total for v in versions],
        labels=[f"served by {v}" for v in versions],
        colors=[VERSION_COLOURS.get(v, "grey") for v in versions],
        alpha=0.55,
    )
    for rid in dict.fromkeys(p["rollout_id"] for p in rs):
        mine = [p for p in rs if p["rollout_id"] == rid]
        cand = mine[0]["candidate"]
        a.step(
            [p["t_s"] for p in mine],
            [p["candidate_percent"] for p in mine],
            where="post",
            color="black",
            lw=1.5,
            ls="--" if cand == "v3" else "-",
            label=f"{cand}'s share set by the rollout",
        )
        tp = [
            (p["t_s"], c)
            for p in mine
            for c in p["checks"]
            if c["metric"].startswith("tpot") and c["samples"]
        ]
        if tp:
            colour = VERSION_COLOURS.get(cand, "grey")
            b.plot(
                [t for t, _ in tp],
                [c["candidate"] for _, c in tp],
                color=colour,
                marker=".",
                label=f"{cand} {tp[0][1]['metric']}",
            )
            # The bound once the baseline has a value (before, the registry has not judged the guardrail).
            judged = [(t, c) for t, c in tp if c["baseline"] > 0 or not c["relative"]]
            b.plot(
                [t for t, _ in judged],
                [c["limit"] * c["baseline"] if c["relative"] else c["limit"] for _, c in judged],
                color=colour,
                ls=":",
                marker="_",  # a guardrail judged once (then promoted or rolled back) is one point
                markersize=16,
                label=f"{cand}'s bound ({tp[0][1]['limit']:g} x the baseline's)",
            )
    for e in record["events"]:
        if e.get("kind") == "rollout":
            for ax in (a, b):
                ax.axvline(e["t_s"], color="grey", lw=0.8, alpha=0.6)
    a.set_ylim(0, 100)
    a.set_ylabel("% of sim-1b requests")
    a.set_xlabel("s (grey: rollout started / decided)")
    a.set_title("Rollout share")
    a.legend(fontsize=7, loc="center left")
    b.set_ylabel("TPOT ms (the registry's window)")
    b.set_xlabel("s")
    b.set_title("Guardrail: the candidate's TPOT vs its bound")
    b.legend(fontsize=7)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def rollout_rows(record: dict) -> list[dict]:
    rows = []
    for r in record["sections"].get("rollout", {}).get("rollouts", []):
        rows.append(
            {
                "canary": f"{r['baseline']} -> {r['candidate']} at {r['percent']:g}%",
                "started s": r["started_s"],
                "decided s": r.get("decided_s") or "",
                "outcome": r["state"].replace("_", " ") + (" (by a guardrail)" if r.get("automatic") else ""),
                "why": r["reason"],
            }
        )
    return rows


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


def _guardrails(rollout: dict) -> list[str]:
    return next((r["guardrails"] for r in rollout.get("rollouts", [])), [])


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
    rv = v.get("rollout", {})
    if "skipped" in rollout:
        badges.append(badge(None, "rollout: skipped"))
    else:
        badges.append(
            badge(
                rv.get("good_promoted"),
                "canary v2 promoted" if rv.get("good_promoted") else "canary v2 NOT promoted",
            )
        )
        badges.append(
            badge(
                rv.get("bad_rolled_back_automatically"),
                "planted-bad v3 rolled back by its guardrail"
                if rv.get("bad_rolled_back_automatically")
                else "planted-bad v3 NOT rolled back",
            )
        )
    cost = v.get("cost", {})
    if cost.get("tokens"):
        badges.append(
            badge(None, f"cost ${cost['total_usd']:.4f}, ${cost['cost_per_1k_tokens_usd']:.5f} per 1k tokens")
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
        "<h2>Canary rollouts</h2>",
        _skipped(rollout)
        or (
            f"<p>Two canaries of sim-1b at {s.get('canary_percent', 0):g}% of its traffic, judged by the same guardrails "
            f"({html.escape(', '.join(_guardrails(rollout)))}): v2 is the same engine; v3 has a planted regression "
            f"({html.escape(str(rollout.get('planted', {}).get('v3', '')))}).</p>"
            + (f"<p class='skipped'>{html.escape(rollout['error'])}</p>" if rollout.get("error") else "")
            + (_img(pngs["rollout"], "rollout") if "rollout" in pngs else "")
            + _table(rollout_rows(record), ["canary", "started s", "decided s", "outcome", "why"])
        ),
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


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 4600) -> bool:
    """A PNG of the page by headless Chromium (loadtest/dashboard_shot.py drives it); False when none is
    installed."""
    import asyncio

    from loadtest.dashboard_shot import browser, chromium

    if browser() is None:
        return False
    asyncio.run(
        chromium(page.resolve().as_uri(), screenshot=png.resolve(), budget_ms=1000, size=(width, height))
    )
    return png.exists()


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.demo.report DIR [--screenshot PNG]`: the report page again from DIR/report.json (after
    a change to this module, without running the demo again), and its screenshot."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m loadtest.demo.report", description=main.__doc__)
    p.add_argument("dir", type=Path, help="a demo's output directory (with report.json)")
    p.add_argument("--screenshot", type=Path, help="also write a PNG of the page here (headless Chromium)")
    args = p.parse_args(argv)
    record = json.loads((args.dir / "report.json").read_text())
    page = write(record, args.dir)
    print(f"wrote {page}", file=sys.stderr)
    if args.screenshot:
        if not screenshot(page, args.screenshot):
            print("no Chromium found: no screenshot", file=sys.stderr)
            return 1
        print(f"wrote {args.screenshot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
