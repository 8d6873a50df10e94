"""A/B statistics validated by simulation: many experiments drawn from known distributions, with a planted effect
of the stated size (A/B) or none (A/A), each judged by the registry's own fixed-horizon analysis
(services.registry.rollouts.experiments: the horizon it sizes, the test it picks, Holm, the verdict's
`significant`). The share of A/B experiments that find the effect is the power actually achieved, the share of A/A
ones that find anything is the false-positive rate; both are checked against the binomial interval of the stated
power and alpha. A peeking control (A/A judged at 10 interim looks, stopping at the first significant one) shows
what the fixed horizon protects against."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from fleetserve.registry.v1 import rollout_service_pb2 as pb

from services.registry.rollouts import experiments
from services.registry.rollouts.stats import Summary

ALPHA = 0.05
POWER = 0.8
LOOKS = 10


@dataclass(frozen=True)
class Scenario:
    """One experiment design: the primary metric and the control's distribution ('normal' or 'lognormal' with
    mean and std, or 'bernoulli' with rate), and the planted absolute effect (treatment = control + mde)."""

    name: str
    metric: str
    dist: str
    mde: float
    mean: float = 0.0
    std: float = 0.0
    rate: float = 0.0

    def spec(self) -> pb.ExperimentSpec:
        """The spec an operator would create (alpha 0.05, power 0.8, the mde and the expected spread)."""
        return pb.ExperimentSpec(
            name=self.name.replace(" ", "-"),
            model="sim",
            primary_metric=self.metric,
            alpha=ALPHA,
            power=POWER,
            mde=self.mde,
            expected_std=self.std if self.dist != "bernoulli" else 0.0,
            expected_rate=self.rate if self.dist == "bernoulli" else 0.0,
            population=pb.Population(percent=100),
            arms=[
                pb.Arm(name="control", variant=pb.Variant(model_version="v1")),
                pb.Arm(name="treatment", variant=pb.Variant(model_version="v2")),
            ],
        )

    def draw(self, rng: np.random.Generator, shape: tuple[int, int], shift: float) -> np.ndarray:
        """Samples of the control's distribution moved by shift (rates: the rate moved by shift)."""
        if self.dist == "normal":
            return rng.normal(self.mean + shift, self.std, shape)
        if self.dist == "lognormal":
            # Latency-like: right-skewed with the given mean and std; the planted effect moves it by shift.
            s2 = math.log(1.0 + (self.std / self.mean) ** 2)
            return rng.lognormal(math.log(self.mean) - s2 / 2.0, math.sqrt(s2), shape) + shift
        if self.dist == "bernoulli":
            return (rng.random(shape) < self.rate + shift).astype(float)
        raise ValueError(f"unknown distribution {self.dist!r}")


SCENARIOS = (
    Scenario("tpot normal", "tpot_ms", "normal", mde=0.5, mean=10.0, std=3.0),
    Scenario("ttft lognormal", "ttft_ms", "lognormal", mde=15.0, mean=120.0, std=80.0),
    Scenario("error rate", "error_rate", "bernoulli", mde=0.02, rate=0.05),
)


def _summary(x: np.ndarray) -> Summary:
    return Summary(int(x.size), float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0)


def _judge(exp: pb.Experiment, metric: str, control: np.ndarray, treatment: np.ndarray, peek: bool):
    """The registry's analysis of one experiment's samples: its first comparison (the primary metric's)."""
    resp = experiments.analyze(
        exp,
        [{metric: _summary(control)}, {metric: _summary(treatment)}],
        [control.size, treatment.size],
        peek,
    )
    return resp.comparisons[0] if resp.comparisons else None


def _rate(k: int, n: int, stated: float) -> dict:
    """An observed rate k/n with its Clopper-Pearson 95% interval, and whether it lies in the central 95%
    binomial interval of n trials at the stated rate (what sampling error alone allows)."""
    from scipy import stats as sps
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(k, n, alpha=0.05, method="beta")
    b_lo, b_hi = sps.binom.interval(0.95, n, stated)
    return {
        "observed": k / n,
        "count": k,
        "experiments": n,
        "ci95": [float(lo), float(hi)],
        "stated": stated,
        "binomial_interval95": [b_lo / n, b_hi / n],
        "within": bool(b_lo <= k <= b_hi),
    }


def run_scenario(s: Scenario, experiments_n: int, seed: int, peeking: bool) -> dict:
    """experiments_n A/B and experiments_n A/A experiments of one design at the registry's horizon."""
    rng = np.random.default_rng(seed)
    spec = s.spec()
    experiments.validate(spec, {"sim": {"v1", "v2"}}, (), ())
    n = experiments.horizon(spec)
    exp = pb.Experiment(experiment_id=spec.name, spec=spec, samples_per_arm=n)
    detected = wrong_way = aa_positive = 0
    covered = 0
    for _ in range(experiments_n):  # bounded: experiments_n draws of two arms each
        c = s.draw(rng, (1, n), 0.0)[0]
        t = s.draw(rng, (1, n), s.mde)[0]
        r = _judge(exp, s.metric, c, t, peek=False)
        if r is not None and r.significant:
            detected += r.difference * s.mde > 0
            wrong_way += r.difference * s.mde < 0
        covered += r is not None and r.ci_low <= s.mde <= r.ci_high
        a, b = s.draw(rng, (2, n), 0.0)
        r = _judge(exp, s.metric, a, b, peek=False)
        aa_positive += r is not None and r.significant
    out = {
        "metric": s.metric,
        "distribution": s.dist,
        "control": {"mean": s.mean, "std": s.std} if s.dist != "bernoulli" else {"rate": s.rate},
        "planted_effect": s.mde,
        "alpha": ALPHA,
        "power": POWER,
        "samples_per_arm": n,
        "test": "welch_t" if s.dist != "bernoulli" else "two_proportion_z",
        "power_achieved": _rate(detected, experiments_n, POWER),
        "significant_in_the_wrong_direction": wrong_way,
        "ci_covers_the_planted_effect": _rate(covered, experiments_n, 1.0 - ALPHA),
        "aa_false_positive_rate": _rate(aa_positive, experiments_n, ALPHA),
    }
    if peeking:
        out["aa_with_peeking"] = _peeking(s, exp, n, experiments_n, rng)
    return out


def _peeking(s: Scenario, exp: pb.Experiment, n: int, experiments_n: int, rng: np.random.Generator) -> dict:
    """A/A judged at LOOKS evenly spaced looks, stopping at the first significant one: the false-positive rate an
    analysis without a fixed horizon would have (the registry refuses these early verdicts unless asked to peek,
    and then marks them as a peek)."""
    looks = [max(2, round(n * (i + 1) / LOOKS)) for i in range(LOOKS)]
    positive = 0
    for _ in range(experiments_n):  # bounded: LOOKS analyses each
        a, b = s.draw(rng, (2, n), 0.0)
        for k in looks:
            r = _judge(exp, s.metric, a[:k], b[:k], peek=True)
            if r is not None and r.significant:
                positive += 1
                break
    rate = _rate(positive, experiments_n, ALPHA)
    rate["looks"] = LOOKS
    return rate


def run(experiments_n: int = 1000, seed: int = 11, progress=lambda msg: None) -> dict:
    """Every scenario; a summary verdict on top."""
    results = {}
    for i, s in enumerate(SCENARIOS):
        progress(f"A/B simulation: {s.name} ({experiments_n} A/B + {experiments_n} A/A experiments)")
        results[s.name] = run_scenario(s, experiments_n, seed + i, peeking=i == 0)
    ok_power = all(r["power_achieved"]["within"] for r in results.values())
    ok_alpha = all(r["aa_false_positive_rate"]["within"] for r in results.values())
    return {
        "experiments_per_scenario": experiments_n,
        "seed": seed,
        "scenarios": results,
        "power_within_binomial_interval": ok_power,
        "false_positive_rate_within_binomial_interval": ok_alpha,
    }
