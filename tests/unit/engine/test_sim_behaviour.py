"""Planted per-version behaviour of the sim: parsing, and what a planted version does to requests (failures,
refusals, short answers, slower steps), deterministically per request id."""

from __future__ import annotations

import pytest
from fleetserve.common.v1 import common_pb2

from services.engine import sim_behaviour
from services.engine.config import EngineSettings
from services.engine.cost_model import CostModel
from services.engine.sim import PlantedFault, SimEngine
from services.engine.sim_behaviour import REFUSAL_TEXT, Behaviour


def spec(max_tokens: int = 16) -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(
        model="sim-1b", prompt="tell me a story", sampling=common_pb2.SamplingParams(max_tokens=max_tokens)
    )


async def run(engine: SimEngine, request_id: str, max_tokens: int = 16):
    ids, text, last = [], [], None
    async for out in engine.generate(request_id, spec(max_tokens)):
        ids += out.token_ids
        text.append(out.text)
        last = out
    return ids, "".join(text), last


@pytest.fixture
async def started():
    engines: list[SimEngine] = []

    async def make(**behaviour) -> SimEngine:
        e = SimEngine(speed_factor=100.0, behaviour=Behaviour(**behaviour))
        await e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        await e.shutdown()


def test_parse_takes_versions_and_a_wildcard():
    """The flag's text gives one Behaviour per version; '*' covers versions without their own entry."""
    table = sim_behaviour.parse("v2:slowdown=2, error_rate=0.05; *:refusal_rate=0.1")
    assert sim_behaviour.for_version(table, "v2") == Behaviour(slowdown=2.0, error_rate=0.05)
    assert sim_behaviour.for_version(table, "v9") == Behaviour(refusal_rate=0.1)
    assert sim_behaviour.for_version({}, "v1") == Behaviour()
    assert not Behaviour().planted and Behaviour(length_factor=0.5).planted


@pytest.mark.parametrize(
    "text, needle",
    [
        ("v2", "VERSION:key=value"),
        ("v2:speed=2", "expected one of"),
        ("v2:slowdown=fast", "not a number"),
        ("v2:error_rate=2", "error_rate must be in [0, 1]"),
        ("v2:length_factor=0", "length_factor"),
        ("v2:slowdown=1;v2:slowdown=2", "given twice"),
    ],
)
def test_parse_refuses_bad_text_naming_the_part(text, needle):
    """A malformed table is a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        sim_behaviour.parse(text)


def test_engine_settings_pick_their_versions_entry_and_refuse_bad_text():
    """--sim-behaviour is checked at start and the replica takes its own version's entry."""
    s = EngineSettings(model_version="v2", sim_behaviour="v1:slowdown=3;v2:error_rate=0.5")
    assert s.behaviour == Behaviour(error_rate=0.5)
    with pytest.raises(ValueError, match="sim_behaviour"):
        EngineSettings(sim_behaviour="v2:bogus=1")


def test_slowdown_multiplies_every_gpu_term_of_a_step():
    """slowdown=2 doubles a step's modelled GPU time and leaves the front end alone."""
    base = CostModel()
    slow = Behaviour(slowdown=2.0).slowed(base)
    assert slow.step_ms(8, 100, 800, 120) == pytest.approx(2 * base.step_ms(8, 100, 800, 120))
    assert slow.frontend_ms(100) == base.frontend_ms(100)
    assert Behaviour().slowed(base) is base


def test_draws_are_deterministic_per_request_and_near_the_rate():
    """The same request id always draws the same way (a retry on another replica of the version fails too),
    and over many ids the share is near the rate."""
    b = Behaviour(error_rate=0.05, refusal_rate=0.2)
    ids = [f"req-{i}" for i in range(4000)]
    fails = [b.fails(0, i) for i in ids]
    assert fails == [b.fails(0, i) for i in ids]
    assert 0.04 < sum(fails) / len(ids) < 0.06
    assert 0.18 < sum(b.refuses(0, i) for i in ids) / len(ids) < 0.22


async def test_a_failing_version_fails_with_internal_before_any_token(started):
    """error_rate=1: generate() raises INTERNAL (PLANTED_FAULT); nothing is left in the engine."""
    engine = await started(error_rate=1.0)
    with pytest.raises(PlantedFault) as exc:
        await run(engine, "a")
    assert exc.value.code.name == "INTERNAL" and exc.value.reason == "PLANTED_FAULT"
    assert engine.load().running == engine.load().waiting == 0


async def test_a_refusing_version_answers_with_the_refusal(started):
    """refusal_rate=1: the answer is the refusal text, ending with STOP."""
    engine = await started(refusal_rate=1.0)
    _, text, last = await run(engine, "a", max_tokens=64)
    assert text == REFUSAL_TEXT
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_a_refusal_is_cut_at_max_tokens(started):
    """A refusal longer than max_tokens ends at max_tokens with LENGTH."""
    engine = await started(refusal_rate=1.0)
    ids, text, last = await run(engine, "a", max_tokens=3)
    assert len(ids) == 3 and REFUSAL_TEXT.startswith(text)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_a_terse_version_stops_early_with_the_same_text(started):
    """length_factor=0.25: a quarter of max_tokens, finish STOP, and the same tokens a full answer begins with."""
    terse = await started(length_factor=0.25)
    full = await started()
    short_ids, _, last = await run(terse, "a", max_tokens=40)
    long_ids, _, _ = await run(full, "a", max_tokens=40)
    assert len(short_ids) == 10 and last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert short_ids == long_ids[:10]
