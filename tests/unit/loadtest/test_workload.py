"""The workload: reproducible prompts of about the asked length, distinct per request and per stream."""

from __future__ import annotations

from loadtest.workload import Workload


def test_prompt_has_the_asked_number_of_words_and_is_reproducible():
    """Same (seed, stream, index) gives the same prompt of prompt_tokens words."""
    w = Workload(prompt_tokens=50, seed=3)
    assert len(w.prompt(7).split()) == 50
    assert w.prompt(7, "mesh") == Workload(prompt_tokens=50, seed=3).prompt(7, "mesh")


def test_prompts_differ_by_index_seed_and_stream():
    """Different requests, seeds or streams (direct vs mesh) get different prompts, so the prefix cache of the
    first run does not speed up the second."""
    w = Workload(seed=1)
    assert w.prompt(0) != w.prompt(1)
    assert w.prompt(0) != Workload(seed=2).prompt(0)
    assert w.prompt(0, "direct") != w.prompt(0, "mesh")
    # Differ within the first KV block (16 tokens), where prefix caching would match.
    assert w.prompt(0, "direct").split()[:16] != w.prompt(0, "mesh").split()[:16]


def test_requests_carry_exact_length_settings():
    """Both request kinds ask for max_tokens with ignore_eos, so every output has exactly max_tokens."""
    w = Workload(model="m", prompt_tokens=8, max_tokens=33, seed=0)
    mesh = w.mesh_request(2)
    assert (mesh.model, mesh.max_tokens, mesh.ignore_eos) == ("m", 33, True)
    assert mesh.prompt == w.prompt(2, "mesh")
    eng = w.engine_request(2)
    assert eng.spec.model == "m" and eng.spec.prompt == w.prompt(2, "direct")
    assert (eng.spec.sampling.max_tokens, eng.spec.sampling.ignore_eos) == (33, True)
    assert eng.request_id.startswith("bench-") and eng.request_id != w.engine_request(2).request_id
