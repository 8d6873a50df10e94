"""The rollout/experiment CLI's own syntax: guardrail rules and arms."""

from __future__ import annotations

import pytest
from fleetserve.registry.v1 import rollout_service_pb2 as pb

from shared.cli.main import build_parser
from shared.cli.rollout import parse_arm, parse_guardrail


def test_guardrail_rules_absolute_relative_gap_and_samples():
    """'<=0.02' is absolute, '1.5x' relative, '+gap' and '@samples' are read, feedback takes '>='."""
    assert parse_guardrail("error_rate<=0.02") == pb.Guardrail(
        metric="error_rate", mode=pb.GUARDRAIL_MODE_ABSOLUTE, limit=0.02
    )
    g = parse_guardrail("error_rate <= 2x+0.01@50")
    assert (g.mode, g.limit, g.min_gap, g.min_samples) == (pb.GUARDRAIL_MODE_RELATIVE, 2.0, 0.01, 50)
    assert parse_guardrail("feedback_rating>=0.9x").limit == 0.9
    # An unknown metric is left to the server, which names the field.
    assert parse_guardrail("vibes<=1").metric == "vibes"


@pytest.mark.parametrize(
    "rule", ["error_rate", "error_rate<0.1", "feedback_rating<=0.9x", "error_rate<=0.1+0.01"]
)
def test_bad_guardrail_rules_say_why(rule):
    with pytest.raises(ValueError, match="guardrail"):
        parse_guardrail(rule)


def test_arms_and_the_verbs_take_their_options_after_the_verb():
    """An arm is NAME:key=value,...; --json and --registry go after any verb."""
    arm = parse_arm("treatment:version=v2,policy=round_robin,percent=50")
    assert (arm.name, arm.variant.model_version, arm.variant.routing_policy, arm.percent) == (
        "treatment", "v2", "round_robin", 50.0
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown key"):
        parse_arm("a:colour=red")
    args = build_parser().parse_args(["rollout", "status", "ro-1", "--json", "--registry", "h:1"])
    assert (args.rollout_id, args.json, args.registry) == ("ro-1", True, "h:1")
    args = build_parser().parse_args(["experiment", "analyze", "faster", "--peek"])
    assert (args.experiment_command, args.experiment, args.peek) == ("analyze", "faster", True)


def test_start_takes_the_confidence_and_what_an_undecided_step_does():
    """--confidence, --max-hold and --on-undecided reach the plan's fields; status describes them."""
    from services.registry.rollouts import plans
    from shared.cli.rollout import UNDECIDED, format_rollout

    args = build_parser().parse_args(
        ["rollout", "start", "--model", "m", "--baseline", "v1", "--candidate", "v2", "--steps", "5,50",
         "--guardrail", "error_rate<=0.02@50", "--confidence", "0.99", "--max-hold", "600",
         "--on-undecided", "rollback"]
    )  # fmt: skip
    assert (args.confidence, args.max_hold, UNDECIDED[args.on_undecided]) == (
        0.99, 600.0, pb.UNDECIDED_ACTION_ROLLBACK
    )  # fmt: skip
    p = pb.RolloutPlan(
        model="m", baseline_version="v1", candidate_version="v2", strategy=pb.ROLLOUT_STRATEGY_GRADUAL,
        steps=[5, 50], bake_s=30, guardrails=[parse_guardrail("error_rate<=0.02@50")],
    )  # fmt: skip
    text = format_rollout(plans.start(p, "ro-1", 0.0))
    assert (
        "rates decided at 95% confidence; a step undecided after its bake is held up to 90s, then pause"
        in text
    )
    assert plans.max_hold_s(pb.RolloutPlan(bake_s=5)) == 60.0
