"""What one pass costs by what its rows do, on the built-in model with the shipped head (best of 7 each).

  .venv/bin/python bench/bench_mixed_pass.py [--threads 1]

For B sequences with 64 cached tokens and blocks of K: a verify pass (AR view, B x K rows), a two-pass
draft pass (twins, AR projections at the causal anchors; B x K rows) and a cross-group pass (half the
sequences verify K rows, the other half draft the anchor and K - 1 MASK rows: B x K rows, the MASK
rows' logits included). A pass that mixes the views reads both views' attention weights.
"""

import argparse
import time
from types import SimpleNamespace

import torch


def best_seconds(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--shapes", nargs="+", default=["2x2", "4x2", "8x2", "2x4", "4x4"], help="BxK")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from orthrus_engines import LLM

    runner = LLM(block_size=8, enable_prefix_cache=False).core.runner
    cached = 64
    for shape in args.shapes:
        b, k = map(int, shape.split("x"))
        pages = -(-(cached + k) // runner.page_size)
        seqs = [SimpleNamespace(num_cached=cached, page_table=list(range(i * pages, (i + 1) * pages)),
                                forward_passes=0, token_ids=[1] * (cached + 1)) for i in range(b)]
        half = b // 2
        blocks, ms = [[1] * k] * half + [[1]] * (b - half), [0] * half + [k - 1] * (b - half)

        def cross():
            _, mask_hidden = runner.verify_and_draft(seqs, blocks, ms)
            runner.logits(mask_hidden, list(range((b - half) * (k - 1))))

        verify = best_seconds(lambda: runner.verify(seqs, [[1] * k] * b))
        draft = best_seconds(lambda: runner.draft(seqs, [k] * b))
        mixed = best_seconds(cross)
        print(f"B={b} K={k} ({b * k} rows): verify {verify * 1e3:.1f} ms, draft {draft * 1e3:.1f} ms "
              f"({draft / verify:.2f}x), cross-group {mixed * 1e3:.1f} ms ({mixed / verify:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
