"""Driving an EngineCore by hand in tests."""

from orthrus_engines import SamplingParams


def prefilled(eng, prompts: list[list[int]]) -> list:
    """The prompts added and prefilled, each with pages for 12 more positions: sequences ready for a pass."""
    seqs = [eng.add_request(f"r{i}", p, SamplingParams(max_tokens=16)) for i, p in enumerate(prompts)]
    while any(s.in_prefill for s in seqs):
        eng.step()
    for s in seqs:
        assert eng.pages.ensure(s, s.num_cached + 12)
    return seqs
