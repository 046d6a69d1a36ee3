"""`auto` draft length against plain AR, side by side in one engine on the built-in model (greedy).

  .venv/bin/python bench/bench_auto.py [--tokens 128] [--rounds 2] [--fixed 8] [--two-pass] [--out docs/bench_auto.json]

One LLM with the shipped head and block_size="auto"; AR requests are the same engine with
SamplingParams(block_size=1). For concurrency 1, 4 and 16 it runs waves of that many held-out chat
prompts, alternating AR, auto and fixed K (`--fixed`) waves in a rotating order so drift hits all
alike, and reports output tokens/s, TPF and the K the policy chose. A causal-anchor head runs one
verify+draft pass per cycle unless `--two-pass`.
"""

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path
from statistics import median

import torch


def run_wave(llm, prompts: list[list[int]], tokens: int, block_size: int | None) -> dict:
    from orthrus_engines import SamplingParams

    chosen = Counter()
    sched = llm.engine.scheduler
    original = sched.choose_k

    def spy(batch: int) -> int:
        k = original(batch)
        chosen[k] += 1
        return k

    sched.choose_k = spy if original is not None else None
    params = SamplingParams(max_tokens=tokens, block_size=block_size)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    sched.choose_k = original
    return {"tokens": sum(o.num_output_tokens for o in outs), "seconds": seconds,
            "passes": sum(o.num_forward_passes for o in outs), "chosen_k": dict(chosen)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="waves per mode and concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--head", help="default: the shipped head")
    ap.add_argument("--fixed", type=int, default=8, help="the fixed K compared with auto")
    ap.add_argument("--two-pass", action="store_true", help="a draft pass and a verify pass per cycle")
    ap.add_argument("--out", default="docs/bench_auto.json")
    args = ap.parse_args()

    from orthrus_engines import LLM
    from orthrus_engines.training.data import packaged_prompts, read_prompts

    # waves repeat prompts: no mode may reuse KV
    llm = LLM(head=args.head, enable_prefix_cache=False, fused_cycle=not args.two_pass)
    tok = llm.tokenizer
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"])
               for p in read_prompts(packaged_prompts("prompts_eval.txt"))]
    llm.generate(prompts[:2], None)  # warm-up
    fixed = f"fixed{args.fixed}"
    modes = {"ar": 1, "auto": None, fixed: args.fixed}
    order = list(modes.items())
    results = {}
    for c in args.concurrency:
        acc = {m: {"tokens": 0, "seconds": 0.0, "passes": 0, "chosen_k": Counter()} for m in modes}
        per_round: list[dict[str, float]] = []  # tok/s of each mode on the same wave: paired, drift-robust
        for r in range(args.rounds):
            wave = [prompts[(r * c + i) % len(prompts)] for i in range(c)]
            turn = r % len(order)  # each mode takes each place in the round in turn
            per_round.append({})
            for m, k in order[turn:] + order[:turn]:
                w = run_wave(llm, wave, args.tokens, k)
                per_round[-1][m] = w["tokens"] / w["seconds"]
                a = acc[m]
                a["tokens"] += w["tokens"]
                a["seconds"] += w["seconds"]
                a["passes"] += w["passes"]
                a["chosen_k"].update(w["chosen_k"])
        row = {m: {"tok_s": a["tokens"] / a["seconds"], "tpf": a["tokens"] / max(a["passes"], 1),
                   "tokens": a["tokens"], "chosen_k": dict(sorted(a["chosen_k"].items()))} for m, a in acc.items()}
        row["auto_vs_ar"] = row["auto"]["tok_s"] / row["ar"]["tok_s"]
        row[f"{fixed}_vs_ar"] = row[fixed]["tok_s"] / row["ar"]["tok_s"]
        row["auto_vs_ar_by_round"] = [x["auto"] / x["ar"] for x in per_round]
        row["auto_vs_ar_median_round"] = median(row["auto_vs_ar_by_round"])
        results[c] = row
        print(f"c={c}: AR {row['ar']['tok_s']:.1f} tok/s, auto {row['auto']['tok_s']:.1f} "
              f"({row['auto_vs_ar']:.2f}x; median of rounds {row['auto_vs_ar_median_round']:.2f}x: "
              f"{', '.join(f'{x:.2f}' for x in row['auto_vs_ar_by_round'])}; K chosen {row['auto']['chosen_k']}), "
              f"K={args.fixed} {row[fixed]['tok_s']:.1f} ({row[f'{fixed}_vs_ar']:.2f}x, TPF {row[fixed]['tpf']:.2f})",
              flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "tokens": args.tokens, "rounds": args.rounds, "head": args.head or "shipped",
            "cycle": "verify+draft" if llm.engine.fused else "draft, verify",
            "forward_times": dict(zip(llm.engine.policy.times.ns, llm.engine.policy.times.ts))}
    if llm.engine.policy.fused_times is not None:
        fused = llm.engine.policy.fused_times
        meta["verify_draft_times"] = dict(zip(fused.ns, fused.ts))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
