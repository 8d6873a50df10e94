"""The A/B simulation (loadtest/ab_simulation.py) judges every simulated experiment with the registry's own analysis
at the registry's own horizon, and reports rates with the binomial interval they are checked against."""

from __future__ import annotations

from loadtest import ab_simulation
from services.registry.rollouts import experiments


def test_a_scenario_runs_at_the_registry_horizon_and_reports_intervals():
    """A few experiments of the mean and rate designs: the horizon is the registry's, rates lie in [0, 1] with
    their intervals, and the peeking control is only run where asked."""
    for s in (ab_simulation.SCENARIOS[0], ab_simulation.SCENARIOS[2]):
        got = ab_simulation.run_scenario(s, experiments_n=12, seed=3, peeking=s is ab_simulation.SCENARIOS[0])
        assert got["samples_per_arm"] == experiments.horizon(s.spec())
        for key in ("power_achieved", "aa_false_positive_rate", "ci_covers_the_planted_effect"):
            r = got[key]
            assert r["experiments"] == 12 and 0.0 <= r["observed"] <= 1.0
            assert r["ci95"][0] <= r["observed"] <= r["ci95"][1]
            lo, hi = r["binomial_interval95"]
            assert lo <= r["stated"] <= hi
        assert ("aa_with_peeking" in got) == (s is ab_simulation.SCENARIOS[0])


def test_the_planted_effect_is_the_stated_one():
    """Treatment draws are the control's moved by exactly the planted effect (means) or rate + effect (rates)."""
    import numpy as np

    for s in ab_simulation.SCENARIOS:
        rng = np.random.default_rng(0)
        c = s.draw(rng, (1, 200_000), 0.0)[0]
        t = s.draw(rng, (1, 200_000), s.mde)[0]
        assert abs((t.mean() - c.mean()) - s.mde) < 0.1 * s.mde + 3 * (c.std() * (2 / c.size) ** 0.5)
