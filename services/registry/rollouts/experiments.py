"""A/B experiments: validation of a spec (arms, population, metric, horizon), a population slice that no other
experiment on the model shares, and the fixed-horizon analysis of per-arm outcomes into comparisons and a verdict."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence

from fleetserve.registry.v1 import rollout_service_pb2 as pb

from services.registry.rollouts import stats
from services.registry.rollouts.stats import Summary
from shared import cohorts
from shared.errors import InvalidArgument

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEFAULT_ALPHA = 0.05
DEFAULT_POWER = 0.8
RUNNING = pb.EXPERIMENT_STATE_RUNNING
STOPPED = pb.EXPERIMENT_STATE_STOPPED
# Which way is better, for the verdict's wording (output length has no better direction).
LOWER_IS_BETTER = frozenset({"ttft_ms", "tpot_ms", "e2e_ms", "cost_usd", "error_rate", "refusal_rate"})
HIGHER_IS_BETTER = frozenset({"feedback_rating", "success_rate"})


def alpha_of(spec: pb.ExperimentSpec) -> float:
    return spec.alpha or DEFAULT_ALPHA


def power_of(spec: pb.ExperimentSpec) -> float:
    return spec.power or DEFAULT_POWER


def arm_percents(spec: pb.ExperimentSpec) -> list[float]:
    """Each arm's percent of the experiment's users (all 0: an equal split)."""
    return cohorts.arm_percents([a.percent for a in spec.arms])


def validate(
    spec: pb.ExperimentSpec,
    versions: Mapping[str, set[str]],
    policies: Collection[str],
    running: Sequence[pb.Experiment],
) -> None:
    """InvalidArgument naming every bad field of spec (running: the experiments it must not share users with)."""
    bad: list[tuple[str, str]] = []
    if not NAME.match(spec.name):
        bad.append(("spec.name", "1-64 letters, digits, '-' or '_', starting with a letter or digit"))
    elif any(e.spec.name == spec.name for e in running):
        bad.append(("spec.name", f"a running experiment is named {spec.name!r}"))
    known = versions.get(spec.model)
    if not spec.model:
        bad.append(("spec.model", "required"))
    elif known is None:
        bad.append(("spec.model", f"no replica of {spec.model!r} has registered"))
    bad += _check_arms(spec, known or set(), policies)
    bad += _check_population(spec.population)
    bad += _check_design(spec)
    if bad:
        raise InvalidArgument(
            "invalid experiment: " + "; ".join(f"{f} {d}" for f, d in bad), field_violations=bad
        )


def _check_arms(spec: pb.ExperimentSpec, known: set[str], policies: Collection[str]) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    if len(spec.arms) < 2:
        bad.append(("spec.arms", "two or more arms: the control first, then the treatments"))
    names = [a.name for a in spec.arms]
    for i, arm in enumerate(spec.arms):
        where = f"spec.arms[{i}]"
        if not NAME.match(arm.name):
            bad.append((f"{where}.name", "1-64 letters, digits, '-' or '_'"))
        elif names.count(arm.name) > 1:
            bad.append((f"{where}.name", f"arm {arm.name!r} is named twice"))
        if not (math.isfinite(arm.percent) and 0.0 <= arm.percent <= 100.0):
            bad.append((f"{where}.percent", f"a percent in [0, 100]; got {arm.percent}"))
        v = arm.variant
        if v.model_version and v.model_version not in known:
            listed = ", ".join(sorted(known)) or "none"
            bad.append(
                (f"{where}.variant.model_version", f"unknown version {v.model_version!r}; known: {listed}")
            )
        if v.routing_policy and v.routing_policy not in policies:
            listed = ", ".join(sorted(policies))
            bad.append(
                (f"{where}.variant.routing_policy", f"unknown policy {v.routing_policy!r}; known: {listed}")
            )
    percents = [a.percent for a in spec.arms]
    if spec.arms and any(percents) and not math.isclose(sum(percents), 100.0, abs_tol=1e-6):
        bad.append(("spec.arms", f"the arms' percents add up to {sum(percents):g}, not 100"))
    variants = [a.variant.SerializeToString(deterministic=True) for a in spec.arms]
    if len(set(variants)) < len(variants):
        bad.append(("spec.arms", "two arms give the same variant: nothing would differ between them"))
    return bad


def _check_population(p: pb.Population) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    if not (math.isfinite(p.percent) and 0.0 < p.percent <= 100.0):
        bad.append(("spec.population.percent", f"a percent of users in (0, 100]; got {p.percent}"))
    elif not (
        math.isfinite(p.offset_percent) and 0.0 <= p.offset_percent and p.offset_percent + p.percent <= 100
    ):
        bad.append(
            ("spec.population.offset_percent", "the slice [offset, offset + percent) must lie in [0, 100]")
        )
    if any(not t for t in p.tenants):
        bad.append(("spec.population.tenants", "tenant ids must not be empty"))
    return bad


def _check_design(spec: pb.ExperimentSpec) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    if spec.primary_metric not in stats.METRICS:
        listed = ", ".join(stats.METRICS)
        return [("spec.primary_metric", f"unknown metric {spec.primary_metric!r}; known: {listed}")]
    if not 0.0 <= spec.alpha < 0.5:
        bad.append(
            ("spec.alpha", f"significance level in (0, 0.5) (0 means {DEFAULT_ALPHA}); got {spec.alpha}")
        )
    if not 0.0 <= spec.power < 1.0:
        bad.append(("spec.power", f"power in (0, 1) (0 means {DEFAULT_POWER}); got {spec.power}"))
    if bad or spec.samples_per_arm:
        return bad
    if not (math.isfinite(spec.mde) and spec.mde != 0.0):
        bad.append(
            (
                "spec.mde",
                "the minimum detectable effect (absolute difference) is required, or samples_per_arm",
            )
        )
        return bad
    try:
        horizon(spec)
    except ValueError as e:
        field = "spec.expected_rate" if stats.is_rate(spec.primary_metric) else "spec.expected_std"
        bad.append((field, str(e)))
    return bad


def horizon(spec: pb.ExperimentSpec) -> int:
    """Samples of the primary metric every arm needs before a verdict (the fixed horizon)."""
    if spec.samples_per_arm:
        return int(spec.samples_per_arm)
    return stats.samples_per_arm(
        spec.primary_metric,
        abs(spec.mde),
        alpha=alpha_of(spec),
        power=power_of(spec),
        expected_std=spec.expected_std,
        expected_rate=spec.expected_rate,
        comparisons=len(spec.arms) - 1,
    )


def _tenants_overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    return not a or not b or bool(set(a) & set(b))


def place(spec: pb.ExperimentSpec, running: Sequence[pb.Experiment]) -> float:
    """The population's offset: the one given (0: the first free slice) where no running experiment on the same
    model and some of the same tenants has users. InvalidArgument naming the experiment in the way."""
    p = spec.population
    taken = sorted(
        (e.spec.population.offset_percent, e.spec.population.offset_percent + e.spec.population.percent, e)
        for e in running
        if e.spec.model == spec.model and _tenants_overlap(e.spec.population.tenants, p.tenants)
    )
    if p.offset_percent:
        for lo, hi, e in taken:
            if p.offset_percent < hi and lo < p.offset_percent + p.percent:
                raise _overlap(spec, e)
        return p.offset_percent
    start = 0.0
    for lo, hi, _ in taken:
        if start + p.percent <= lo + 1e-9:
            break
        start = max(start, hi)
    if start + p.percent > 100.0 + 1e-9:
        raise _overlap(spec, taken[-1][2] if taken else None)
    return start


def _overlap(spec: pb.ExperimentSpec, other: pb.Experiment | None) -> InvalidArgument:
    who = (
        f"experiment {other.spec.name!r} ({other.experiment_id})"
        if other is not None
        else "other experiments"
    )
    msg = (
        f"{spec.population.percent:g}% of {spec.model!r} users would overlap {who}, which takes the same users; "
        "stop it, give fewer users, or other tenants"
    )
    return InvalidArgument(msg, field_violations=[("spec.population", msg)])


# -- analysis ------------------------------------------------------------------------------------------------


def analyze(
    experiment: pb.Experiment, arms: Sequence[Mapping[str, Summary]], requests: Sequence[int], peek: bool
) -> pb.AnalyzeExperimentResponse:
    """Comparisons of every treatment arm with the control (the primary metric first, Holm-adjusted per metric)
    and the verdict. Before every arm reached the horizon there is no verdict; with peek the tests are shown,
    marked as a peek."""
    spec = experiment.spec
    primary = spec.primary_metric
    alpha = alpha_of(spec)
    resp = pb.AnalyzeExperimentResponse(experiment=experiment, peek=False)
    for arm, summaries, n in zip(spec.arms, arms, requests, strict=True):
        out = resp.arms.add(arm=arm.name, requests=n)
        for metric in stats.METRICS:
            s = summaries.get(metric)
            if s is not None and s.count:
                out.metrics.add(metric=metric, count=s.count, mean=s.mean, std=s.std)
    counts = [a.get(primary, Summary(0, 0.0)).count for a in arms]
    resp.horizon_reached = all(c >= experiment.samples_per_arm for c in counts)
    if not resp.horizon_reached and not peek:
        have = ", ".join(
            f"{a.name} {c}/{experiment.samples_per_arm}" for a, c in zip(spec.arms, counts, strict=True)
        )
        resp.verdict = (
            f"no verdict before the fixed horizon: {have} samples of {primary} (ask with peek for a look that "
            "decides nothing)"
        )
        return resp
    resp.peek = not resp.horizon_reached
    for metric in [primary, *(m for m in stats.METRICS if m != primary)]:
        _compare_metric(resp, spec, metric, arms, alpha)
    verdict = _verdict(resp, spec, alpha)
    resp.verdict = f"PEEK before the horizon, not a decision: {verdict}" if resp.peek else verdict
    return resp


def _compare_metric(resp, spec, metric: str, arms: Sequence[Mapping[str, Summary]], alpha: float) -> None:
    control = arms[0].get(metric)
    if control is None:
        return
    results = []
    for arm, summaries in zip(spec.arms[1:], arms[1:], strict=True):
        treatment = summaries.get(metric)
        r = stats.compare(metric, control, treatment, alpha) if treatment is not None else None
        if r is not None:
            results.append((arm.name, r))
    adjusted = stats.holm([r.p_value for _, r in results], alpha)
    for (name, r), p_adj in zip(results, adjusted, strict=True):
        resp.comparisons.add(
            arm=name,
            metric=metric,
            test=r.test,
            difference=r.difference,
            relative_difference=r.relative_difference,
            ci_low=r.ci_low,
            ci_high=r.ci_high,
            p_value=r.p_value,
            p_adjusted=p_adj,
            effect_size=r.effect_size if math.isfinite(r.effect_size) else 0.0,
            significant=p_adj < alpha,
        )
    if stats.is_rate(metric) and len(arms) > 2:
        p = stats.chi_squared([a.get(metric, Summary(0, 0.0)) for a in arms])
        if p is not None:
            resp.comparisons.add(arm="*", metric=metric, test=stats.CHI_SQUARED, p_value=p, p_adjusted=p,
                                 significant=p < alpha)  # fmt: skip


def _verdict(resp: pb.AnalyzeExperimentResponse, spec: pb.ExperimentSpec, alpha: float) -> str:
    primary = spec.primary_metric
    mine = [c for c in resp.comparisons if c.metric == primary and c.arm != "*"]
    if not mine:
        return f"no test of {primary} possible yet: an arm has fewer than 2 samples"
    parts = []
    for c in mine:
        level = 1 - alpha
        effect = (
            f"{c.arm} {primary} {c.difference:+.4g} ({c.relative_difference:+.1%}) vs {spec.arms[0].name}, "
            f"{level:.0%} CI [{c.ci_low:+.4g}, {c.ci_high:+.4g}], p={c.p_value:.3g} (Holm {c.p_adjusted:.3g})"
        )
        if not c.significant:
            parts.append(f"{effect}: no significant difference")
            continue
        if primary in LOWER_IS_BETTER:
            word = "better" if c.difference < 0 else "worse"
        elif primary in HIGHER_IS_BETTER:
            word = "better" if c.difference > 0 else "worse"
        else:
            word = "higher" if c.difference > 0 else "lower"
        parts.append(f"{effect}: significantly {word}")
    return "; ".join(parts)
