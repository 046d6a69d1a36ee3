"""The `auto` policy against every fixed plan, side by side in one engine on the built-in model (greedy).

  .venv/bin/python bench/bench_auto.py [--tokens 128] [--rounds 2] [--two-pass-k 2 4 8] [--out docs/bench_auto.json]
  .venv/bin/python bench/bench_auto.py --no-auto --fused-k --two-pass-k 2 4 --cross-k 2 4 --concurrency 2 4 8 \
      --tokens 48 --rounds 3 --threads 1 --out docs/bench_cross_group.json   # the cross-group plan vs AR, two-pass

One LLM with the shipped head and block_size="auto". A fixed plan (plain AR, the two-pass cycle at
K, the fused cycle at K) is the same engine with its scheduler's policy replaced by that plan for
the wave. For concurrency 1, 4 and 16 it runs waves of that many held-out chat prompts, every mode
on the same wave in a rotating order so drift hits all alike, and reports output tokens/s, TPF,
ratios to AR (totals and the median of paired rounds), auto against the best fixed plan, and the
plans the policy chose. `--cross-k` adds the cross-group plan (one group's verify rows and another's
draft block in each pass) at those K; `--no-auto` and `--fused-k` narrow the modes compared.
"""

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path
from statistics import median

import torch

from orthrus_engines.engine.draft_policy import Plan


def run_wave(llm, prompts: list[list[int]], tokens: int, plan: Plan | None) -> dict:
    """One wave of requests that let the policy choose; `plan` set: every step runs that plan instead."""
    from orthrus_engines import SamplingParams

    chosen = Counter()
    sched = llm.core.scheduler
    policy = sched.policy

    def spy(batch: int) -> Plan:
        p = plan or policy(batch)
        chosen[label(p)] += 1
        return p

    sched.policy = spy
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=tokens))
    seconds = time.perf_counter() - start
    sched.policy = policy
    return {"tokens": sum(o.completion_tokens for o in outs), "seconds": seconds,
            "passes": sum(o.forward_passes for o in outs), "chosen": dict(chosen)}


def label(plan: Plan) -> str:
    kind = "cross" if plan.cross else "fused" if plan.fused else "two-pass"
    return "AR" if plan.k == 1 else f"{kind} K={plan.k}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="waves per mode and concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--head", help="default: the shipped head")
    ap.add_argument("--two-pass-k", type=int, nargs="+", default=[2, 4, 8], help="fixed two-pass Ks compared")
    ap.add_argument("--fused-k", type=int, nargs="*", help="fixed fused Ks compared (default: 2 .. the cap)")
    ap.add_argument("--cross-k", type=int, nargs="*", default=[], help="fixed cross-group Ks compared")
    ap.add_argument("--no-auto", action="store_true", help="fixed plans only")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a CPU shared with other work")
    ap.add_argument("--out", default="docs/bench_auto.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from orthrus_engines import LLM
    from orthrus_engines.training.data import packaged_prompts, read_prompts

    # waves repeat prompts: no mode may reuse KV
    llm = LLM(head=args.head, enable_prefix_cache=False)
    eng = llm.core
    prompts = [eng.inputs.chat_ids([{"role": "user", "content": p}])
               for p in read_prompts(packaged_prompts("prompts_eval.txt"))]
    llm.generate(prompts[:2], None)  # warm-up
    plans = [Plan(1)] + [Plan(k) for k in args.two_pass_k if k <= eng.block_size]
    fused_ks = range(2, eng.fused_k + 1) if args.fused_k is None else [k for k in args.fused_k if k <= eng.fused_k]
    plans += [Plan(k, fused=True) for k in fused_ks]
    plans += [Plan(k, cross=True) for k in args.cross_k if k <= eng.block_size and eng.fused_k]
    modes: dict[str, Plan | None] = ({} if args.no_auto else {"auto": None}) | {label(p): p for p in plans}
    order = list(modes.items())
    results = {}
    for c in args.concurrency:
        acc = {m: {"tokens": 0, "seconds": 0.0, "passes": 0, "chosen": Counter()} for m in modes}
        per_round: list[dict[str, float]] = []  # tok/s of each mode on the same wave: paired, drift-robust
        for r in range(args.rounds):
            wave = [prompts[(r * c + i) % len(prompts)] for i in range(c)]
            turn = r % len(order)  # each mode takes each place in the round in turn
            per_round.append({})
            for m, plan in order[turn:] + order[:turn]:
                w = run_wave(llm, wave, args.tokens, plan)
                per_round[-1][m] = w["tokens"] / w["seconds"]
                a = acc[m]
                a["tokens"] += w["tokens"]
                a["seconds"] += w["seconds"]
                a["passes"] += w["passes"]
                a["chosen"].update(w["chosen"])
        row = {m: {"tok_s": a["tokens"] / a["seconds"], "tpf": a["tokens"] / max(a["passes"], 1),
                   "tokens": a["tokens"], "vs_ar": a["tokens"] / a["seconds"] / (acc["AR"]["tokens"] /
                                                                                 acc["AR"]["seconds"]),
                   "median_round_vs_ar": median(x[m] / x["AR"] for x in per_round),
                   "rounds_vs_ar": [round(x[m] / x["AR"], 3) for x in per_round],
                   "chosen": dict(sorted(a["chosen"].items()))} for m, a in acc.items()}
        best = max((m for m in modes if m != "auto"), key=lambda m: row[m]["tok_s"])
        results[c] = {"modes": row, "best_fixed": best}
        print(f"c={c}: " + "; ".join(f"{m} {row[m]['tok_s']:.1f} tok/s ({row[m]['vs_ar']:.2f}x AR, median round "
                                     f"{row[m]['median_round_vs_ar']:.2f}x, TPF {row[m]['tpf']:.2f})" for m in modes),
              flush=True)
        if "auto" in modes:
            results[c]["auto_vs_best"] = row["auto"]["tok_s"] / row[best]["tok_s"]
            print(f"  auto / best fixed ({best}) = {results[c]['auto_vs_best']:.2f}; auto chose "
                  f"{row['auto']['chosen']}", flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "tokens": args.tokens, "rounds": args.rounds, "head": args.head or "shipped",
            "forward_times": dict(zip(eng.policy.times.ns, eng.policy.times.ts))}
    if eng.policy.fused_times is not None:
        meta["verify_draft_times"] = dict(zip(eng.policy.fused_times.ns, eng.policy.fused_times.ts))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
