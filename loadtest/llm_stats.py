"""What Locust's request stats do not hold: time to first token, time per output token and output tokens per
scenario, in DDSketches (1% relative accuracy) on the master or a single process, fed by the workers' raw values
in a distributed run; the rows of the report's LLM table and CSV."""

from __future__ import annotations

import csv
import html
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.summary import RequestResult
from services.metrics.sketches import merged, new_sketch

QUANTILES = (0.5, 0.9, 0.95, 0.99)
COLUMNS = (
    "Type",
    "Name",
    "Requests OK",
    "Output tokens",
    "Output tokens/s",
    *(f"TTFT p{int(q * 100)} ms" for q in QUANTILES),
    *(f"TPOT p{int(q * 100)} ms" for q in QUANTILES),
)


@dataclass
class _Entry:
    ok: int = 0
    tokens: int = 0
    ttft: object = field(default_factory=new_sketch)
    tpot: object = field(default_factory=new_sketch)

    def merge(self, other: _Entry) -> None:
        self.ok += other.ok
        self.tokens += other.tokens
        self.ttft = merged([self.ttft, other.ttft])
        self.tpot = merged([self.tpot, other.tpot])


class LlmStats:
    """Per (type, name) entry: successful requests, their output tokens, TTFT and TPOT sketches (ms).

    A Locust worker (worker=True) keeps the raw values since its last report instead, and the master adds them
    to its sketches: exact, and nothing but floats on the wire."""

    def __init__(self, worker: bool = False) -> None:
        self.worker = worker
        self.entries: dict[tuple[str, str], _Entry] = {}
        self._pending: dict[tuple[str, str], list] = {}

    def record(self, kind: str, name: str, result: RequestResult) -> None:
        """Account one finished request (failures are Locust's to count: they carry no throughput)."""
        if not result.ok:
            return
        ttft = result.ttft_s * 1000.0 if result.ttft_s is not None else None
        tpot = result.tpot_s * 1000.0 if result.tpot_s is not None else None
        if self.worker:
            p = self._pending.setdefault((kind, name), [0, 0, [], []])
            p[0] += 1
            p[1] += result.output_tokens
            if ttft is not None:
                p[2].append(ttft)
            if tpot is not None:
                p[3].append(tpot)
            return
        self._add(
            kind, name, 1, result.output_tokens, [ttft] if ttft is not None else [], [tpot] if tpot else []
        )

    def _add(self, kind: str, name: str, ok: int, tokens: int, ttfts, tpots) -> None:
        e = self.entries.get((kind, name))
        if e is None:
            e = self.entries[(kind, name)] = _Entry()
        e.ok += ok
        e.tokens += tokens
        for v in ttfts:
            e.ttft.add(v)
        for v in tpots:
            e.tpot.add(v)

    def serialize_and_reset(self) -> list:
        """What a worker sends the master with each report (msgpack-friendly), forgetting it here."""
        out = [[kind, name, *p] for (kind, name), p in self._pending.items()]
        self._pending = {}
        return out

    def merge(self, data: list) -> None:
        """Add a worker's report."""
        for kind, name, ok, tokens, ttfts, tpots in data:
            self._add(kind, name, ok, tokens, ttfts, tpots)

    def rows(self, duration_s: float) -> list[dict]:
        """One row per entry, then "Aggregated" (tokens/s over the run's duration)."""
        total = _Entry()
        rows = []
        for (kind, name), e in sorted(self.entries.items()):
            rows.append(_row(kind, name, e, duration_s))
            total.merge(e)
        rows.append(_row("", "Aggregated", total, duration_s))
        return rows

    def write_csv(self, path: Path, duration_s: float) -> None:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.rows(duration_s))

    def html_table(self, duration_s: float) -> str:
        """The LLM section for Locust's HTML report (plain HTML: the report page renders it below its own)."""
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in COLUMNS) + "</tr>"
            for r in self.rows(duration_s)
        )
        return (
            '<section id="fleetserve-llm" style="font-family:sans-serif;margin:2em">'
            "<h2>LLM metrics (fleetserve)</h2>"
            "<p>Each request is counted once in Locust's tables above; time to first token (TTFT), time per output "
            "token (TPOT) and output tokens of the successful requests are here.</p>"
            f'<table border="1" cellpadding="4" style="border-collapse:collapse"><tr>{head}</tr>{body}</table>'
            "</section>"
        )


def _q(sketch, q: float) -> float | str:
    return round(sketch.get_quantile_value(q), 2) if sketch.count else ""


def _row(kind: str, name: str, e: _Entry, duration_s: float) -> dict:
    row = {
        "Type": kind,
        "Name": name,
        "Requests OK": e.ok,
        "Output tokens": e.tokens,
        "Output tokens/s": round(e.tokens / duration_s, 1) if duration_s > 0 else "",
    }
    for q in QUANTILES:
        row[f"TTFT p{int(q * 100)} ms"] = _q(e.ttft, q)
        row[f"TPOT p{int(q * 100)} ms"] = _q(e.tpot, q)
    return row
