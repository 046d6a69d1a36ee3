"""Driving one forward pass by hand in tests."""


def prefill_to_anchor(eng, seqs: list, lookahead: int = 0) -> None:
    """Cache every position but the anchor (the last token) of queued requests, with pages for
    `lookahead` more: the state a decode pass starts from. (A scheduled prefill would go on through
    the anchor and commit the next token.) The requests stay queued; abort them when done."""
    for s in seqs:
        assert eng.pages.ensure(s, s.prefill_target + lookahead)
    todo = [s for s in seqs if s.prefill_target > 0]
    if todo:
        eng.runner.prefill(todo, [s.prefill_target for s in todo])
    for s in seqs:
        s.num_cached = s.prefill_target
