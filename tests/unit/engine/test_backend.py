"""Unit tests for the pieces every engine backend shares (services/engine/backend.py)."""

import grpc
import pytest

from services.engine.backend import RequestIdInUse, TokenRate, check_admissible, check_resume_ids
from shared.errors import InvalidArgument, ShuttingDown, Unavailable


def test_token_rate_averages_over_the_window_and_forgets_older_steps():
    """The rate is tokens in the window over its span (time since start while shorter); old steps age out."""
    rate = TokenRate(5.0, started=100.0)
    assert rate.rate(100.0) == 0.0
    rate.add(101.0, 10)
    rate.add(102.0, 30)
    assert rate.rate(102.0) == pytest.approx(40 / 2.0)
    assert rate.rate(106.5) == pytest.approx(30 / 5.0)
    assert rate.rate(108.0) == 0.0


def test_check_admissible_orders_shutting_down_then_not_running_then_id_in_use():
    """Each refusal has its own typed error, and a free id on a running replica passes."""
    with pytest.raises(ShuttingDown):
        check_admissible(closing=True, running=False, request_id="a", live={"a"})
    with pytest.raises(Unavailable) as e:
        check_admissible(closing=False, running=False, request_id="a", live={"a"})
    assert not isinstance(e.value, ShuttingDown)
    with pytest.raises(RequestIdInUse) as e:
        check_admissible(closing=False, running=True, request_id="a", live={"a"})
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    check_admissible(closing=False, running=True, request_id="b", live={"a"})


def test_check_resume_ids_rejects_ids_outside_the_vocabulary():
    """An id >= vocab_size is INVALID_ARGUMENT on spec.resume_token_ids; in-range or empty ids pass."""
    check_resume_ids([], 10)
    check_resume_ids([0, 9], 10)
    with pytest.raises(InvalidArgument) as e:
        check_resume_ids([3, 10], 10)
    assert e.value.field_violations[0][0] == "spec.resume_token_ids"
