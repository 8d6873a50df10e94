"""Sim fidelity: the fixed-seed workloads run on real vLLM and on the sim engine (mixed prompt lengths, a shared
prefix), and the comparison of the two against the targets (TTFT/TPOT p50 within 15%, tokens/s within 10%)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from loadtest.workload import Workload

# Prompt lengths (words, about one token each) of the mixed workload, drawn per request with the seed.
MIXED_LENGTHS = (32, 128, 512, 1024)
SHARED_PREFIX_WORDS = 1024
SHARED_SUFFIX_WORDS = 32
TARGETS = {"ttft_p50": 0.15, "tpot_p50": 0.15, "output_tokens_per_s": 0.10}


@dataclass(frozen=True)
class MixedWorkload(Workload):
    """Prompts of MIXED_LENGTHS words, the length a function of (seed, stream, index)."""

    def prompt(self, index: int, stream: str = "") -> str:
        rng = random.Random(f"mixed-len:{self.seed}:{stream}:{index}")
        n = rng.choice(MIXED_LENGTHS)
        return Workload(prompt_tokens=n, seed=self.seed).prompt(index, stream)


@dataclass(frozen=True)
class SharedPrefixWorkload(Workload):
    """Every prompt starts with the same SHARED_PREFIX_WORDS words (one tenant, so the prefix cache serves it)
    and ends with SHARED_SUFFIX_WORDS words of its own."""

    def prompt(self, index: int, stream: str = "") -> str:
        prefix = Workload(prompt_tokens=SHARED_PREFIX_WORDS, seed=self.seed).prompt(0, "shared-prefix")
        return (
            prefix + " " + Workload(prompt_tokens=SHARED_SUFFIX_WORDS, seed=self.seed).prompt(index, stream)
        )


def workload(name: str, *, model: str, max_tokens: int = 256, seed: int = 0) -> Workload:
    cls = {"mixed": MixedWorkload, "shared_prefix": SharedPrefixWorkload}[name]
    return cls(model=model, prompt_tokens=0, max_tokens=max_tokens, seed=seed)


def rescale(rec: dict, speed_factor: float) -> dict:
    """A sim record measured at speed_factor, in modelled time (what the sim claims for the GPU): times x factor,
    tok/s / factor; the wall-clock values kept under `wall` with the factor."""
    if speed_factor == 1.0:
        return rec
    out = dict(rec)
    out["speed_factor"] = speed_factor
    out["wall"] = {k: rec[k] for k in (*_TIMES, "output_tokens_per_s", "duration_s")}
    for k in (*_TIMES, "duration_s"):
        if rec[k] is not None:
            out[k] = round(rec[k] * speed_factor, 3)
    out["output_tokens_per_s"] = round(rec["output_tokens_per_s"] / speed_factor, 1)
    return out


_TIMES = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")


def _rel(sim: float | None, real: float | None) -> float | None:
    return None if sim is None or not real else round((sim - real) / real, 4)


def compare(records: list[dict]) -> list[dict]:
    """One row per (workload, concurrency) with both modes: sim's relative error against vLLM per metric and
    whether it is within its target."""
    by_key: dict[tuple[str, int], dict[str, dict]] = {}
    for r in records:
        by_key.setdefault((r["workload"], r["concurrency"]), {})[r["mode"]] = r
    rows = []
    for (name, c), modes in sorted(by_key.items()):
        if {"sim", "vllm"} - modes.keys():
            continue
        sim, real = modes["sim"], modes["vllm"]
        row: dict = {"workload": name, "concurrency": c}
        for metric, key in (
            ("ttft_p50", "ttft_p50_ms"),
            ("tpot_p50", "tpot_p50_ms"),
            ("output_tokens_per_s", "output_tokens_per_s"),
        ):
            err = _rel(sim[key], real[key])
            row[f"{metric}_rel_err"] = err
            row[f"{metric}_ok"] = err is not None and abs(err) <= TARGETS[metric]
        rows.append(row)
    return rows


def markdown(records: list[dict], rows: list[dict]) -> str:
    """The fidelity table: both modes' numbers and sim's error per (workload, concurrency)."""
    by = {(r["workload"], r["concurrency"], r["mode"]): r for r in records}
    out = [
        "| workload | c | vLLM tok/s | sim tok/s | err | vLLM TTFT p50 ms | sim | err | vLLM TPOT p50 ms | sim | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(x: float | None, ok: bool) -> str:
        return "—" if x is None else f"{x * 100:+.1f}%{'' if ok else ' ✗'}"

    def num(x) -> str:
        return "—" if x is None else f"{x:,.1f}"

    for row in rows:
        v = by[(row["workload"], row["concurrency"], "vllm")]
        s = by[(row["workload"], row["concurrency"], "sim")]
        out.append(
            f"| {row['workload']} | {row['concurrency']} "
            f"| {num(v['output_tokens_per_s'])} | {num(s['output_tokens_per_s'])} "
            f"| {pct(row['output_tokens_per_s_rel_err'], row['output_tokens_per_s_ok'])} "
            f"| {num(v['ttft_p50_ms'])} | {num(s['ttft_p50_ms'])} | {pct(row['ttft_p50_rel_err'], row['ttft_p50_ok'])} "
            f"| {num(v['tpot_p50_ms'])} | {num(s['tpot_p50_ms'])} | {pct(row['tpot_p50_rel_err'], row['tpot_p50_ok'])} |"
        )
    return "\n".join(out) + "\n"


def merge(vllm_doc: dict, sim_doc: dict, *, previous_key: str = "previous_profile") -> dict:
    """The published fidelity document: vLLM's records as measured (vllm_doc), the sim's from a later run
    (sim_doc, another machine), the comparison; vllm_doc's own sim records kept under previous_key."""
    vllm = [r for r in vllm_doc["records"] if r["mode"] == "vllm"]
    sim = [r for r in sim_doc["records"] if r["mode"] == "sim"]
    records = vllm + sim
    doc = {k: v for k, v in vllm_doc.items() if k not in ("records", "comparison", previous_key)}
    doc["sim_run"] = {k: v for k, v in sim_doc.items() if k not in ("records", "comparison")}
    doc["records"] = records
    doc["comparison"] = compare(records)
    old = [r for r in vllm_doc["records"] if r["mode"] == "sim"]
    doc[previous_key] = vllm_doc.get(previous_key) or {
        "records": old,
        "comparison": compare(vllm + old),
    }
    return doc


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.fidelity --vllm A.json --sim B.json --out C.json`: merge and print the table."""
    import argparse
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--vllm", required=True, help="fidelity JSON holding the vLLM records (gpu_bench)")
    ap.add_argument("--sim", required=True, help="fidelity JSON of a sim-only gpu_bench run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    doc = merge(json.loads(Path(args.vllm).read_text()), json.loads(Path(args.sim).read_text()))
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(doc["records"], doc["comparison"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
