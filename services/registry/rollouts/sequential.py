"""Rate guardrails decided by an always-valid confidence sequence, so that judging a step's growing sample several
times a second neither lets a bad version through on a lucky clean start nor rolls a good one back on an unlucky
run of errors.

The rule. A rollout step gives a growing count of s bad outcomes (errors, refusals) in n trials. For a rate p0,
Robbins' beta-binomial mixture

    M_n(p0) = B(a + s, b + n - s) / B(a, b) / (p0^s (1 - p0)^(n - s))

(the likelihood of the data averaged over a Beta(a, b) prior on the rate, over its likelihood at p0) is a
nonnegative martingale with mean 1 when the true rate is p0, so by Ville's inequality P(M_n(p0) ever reaches
1/alpha, at any n) <= alpha. The set {p0 : M_n(p0) < 1/alpha} is therefore a confidence sequence: it holds the
true rate at every n at once with probability >= 1 - alpha, however often and whenever it is looked at (Howard,
Ramdas, McAuliffe, Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Stat. 2021,
section on the beta-binomial mixture). log M_n(p0) is convex in p0 with its minimum (<= 0) at s / n, so the set
is an interval [lower, upper]. A guardrail with limit L is

- breached once lower > L (a version within its limit is ever rolled back with probability <= alpha),
- ok once upper <= L (a version over its limit ever advances with probability <= alpha),
- undecided in between: the step holds.

Why this rule and not the alternatives. A fixed-n binomial bound is only valid at one look, and the controller
looks continuously (a 5%-error version passed a 2% point-estimate rule on 13% of 40-request steps). Wald's SPRT
is valid under continuous looking but needs a "good" and a "bad" rate for each guardrail, which the existing
syntax (one LIMIT) does not give, and it promises nothing for rates between the two. The mixture needs only the
limit and a prior; its bounds are what an operator reads ("95% lower bound 0.031 > limit 0.02"). The prior is
Beta(1, (1 - L) / L): its mean is the limit, so it puts its weight on the rates a guardrail at L is about (0 to a
few L), which is where the sequence is tightest; with it a 0-error version shows <= 2% after 236 requests and a
15%-error one is rolled back after ~37 (see docs/rollouts.md for the measured cost).

Why hand-written: scipy has the beta function and root finding (used below) but no confidence sequence; the rule
itself is the few lines of `log_evidence` and `verdicts`. statsmodels' proportion_confint is the fixed-n interval this replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_CONFIDENCE = 0.95
OK, BREACH, UNDECIDED = "ok", "breach", "undecided"
# The most samples samples_needed looks ahead to; beyond it the answer is "never at this rate" (0).
MAX_LOOKAHEAD = 10**9
_EPS = 1e-12


@dataclass(frozen=True, slots=True)
class Decision:
    """One look at a rate: the verdict, the confidence interval, and (undecided) about how many more samples would
    decide it if the rate stayed where it is (0: decided, or never at this rate)."""

    verdict: str
    rate: float
    lower: float
    upper: float
    samples_needed: int = 0


def prior(limit: float) -> tuple[float, float]:
    """Beta(a, b) with mean `limit` (see the module docstring); limit in (0, 1)."""
    return 1.0, (1.0 - limit) / limit


def log_evidence(n, s, p0: float, a: float, b: float):
    """log M_n(p0): the log of the mixture's likelihood ratio against the rate p0, for p0 in (0, 1) (n and s may be
    numpy arrays, and fractional: samples_needed extrapolates)."""
    # scipy is imported where it is used: at module level it was ~0.45 s of every registry's start-up (half of
    # it), paid even by fleets that never run a rollout; the first judgement pays it once instead.
    from scipy.special import betaln

    return betaln(a + s, b + n - s) - betaln(a, b) - s * np.log(p0) - (n - s) * np.log1p(-p0)


def verdicts(n, s, limit: float, confidence: float = DEFAULT_CONFIDENCE):
    """The verdict codes (1 breach, -1 ok, 0 undecided) of s bad outcomes in n trials against limit in (0, 1), for
    numpy arrays of n and s (the simulation in loadtest/guardrail_sim.py judges millions at once): decided once the
    evidence against the limit reaches 1/alpha, i.e. once the limit is outside the interval, on the side the rate
    is not."""
    n, s = np.asarray(n, dtype=float), np.asarray(s, dtype=float)
    a, b = prior(limit)
    decided = log_evidence(n, s, limit, a, b) >= math.log(1.0 / (1.0 - confidence))
    return np.where(decided, np.where(s > limit * n, 1, -1), 0)


def bounds(n: int, s: int, confidence: float, limit: float) -> tuple[float, float]:
    """The confidence sequence's interval for the rate after s in n (with the prior of a guardrail at limit)."""
    a, b = prior(limit)
    threshold = math.log(1.0 / (1.0 - confidence))
    rate = s / n

    def f(p0: float) -> float:
        return float(log_evidence(n, s, p0, a, b)) - threshold

    # f is convex in p0 with its minimum at the rate, where it is < 0; it grows without bound towards an end
    # that s (or n - s) is not 0 at, and stays finite towards one it is.
    from scipy.optimize import brentq  # see log_evidence

    lo = 0.0 if s == 0 or f(_EPS) < 0 else brentq(f, _EPS, min(rate, 1 - _EPS))
    hi = 1.0 if s == n or f(1 - _EPS) < 0 else brentq(f, max(rate, _EPS), 1 - _EPS)
    return lo, hi


def decide(n: int, s: int, limit: float, confidence: float = DEFAULT_CONFIDENCE) -> Decision:
    """The rule for s bad outcomes in n > 0 trials against `limit`. A limit of 0 (no bad outcome allowed) or 1 (any
    rate passes) is decided exactly: no sequence can show a rate is 0, and none is needed to show it is <= 1."""
    rate = s / n
    if limit <= 0.0:
        return Decision(BREACH if s else OK, rate, rate, rate)
    if limit >= 1.0:
        return Decision(OK, rate, rate, rate)
    lo, hi = bounds(n, s, confidence, limit)
    # The verdict from the evidence at the limit itself (the bounds are its roots, found to a tolerance).
    v = int(verdicts(n, s, limit, confidence))
    if v == 1:
        return Decision(BREACH, rate, lo, hi)
    if v == -1:
        return Decision(OK, rate, lo, hi)
    return Decision(UNDECIDED, rate, lo, hi, samples_needed(n, s, limit, confidence))


def samples_needed(n: int, s: int, limit: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """About how many more samples decide a rate s / n against limit if it stays s / n (0 when it sits at the
    limit, where nothing decides it, or needs more than MAX_LOOKAHEAD)."""
    rate = s / n
    if rate == limit:
        return 0
    a, b = prior(limit)
    threshold = math.log(1.0 / (1.0 - confidence))

    def f(m: float) -> float:
        # The evidence at m samples with the rate unchanged, measured from the side of the limit it is on.
        return float(log_evidence(m, rate * m, limit, a, b)) - threshold

    from scipy.optimize import brentq  # see log_evidence

    lo, hi = float(n), float(max(n, 1)) * 2.0
    while f(hi) < 0:
        lo, hi = hi, hi * 2.0
        if hi > MAX_LOOKAHEAD:
            return 0
    m = brentq(f, lo, hi) if f(lo) < 0 else lo
    return max(1, math.ceil(m) - n)
