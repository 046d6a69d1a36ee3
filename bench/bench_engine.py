"""Engine benchmark on the built-in model (CPU fp32 by default), everything measured in one run.

  .venv/bin/python bench/bench_engine.py [--tokens 64] [--out docs/bench_engine.json]

1. AR mode of this engine (block_size=1), eager and with `compile=True`, vs HF transformers
   `generate`: tokens/s at batch 1 and aggregate tokens/s at 4 and 16 concurrent requests (HF: one
   padded batch).
2. Orthrus mode at K = 4, 8, 16, 32: tokens/s and TPF = generated tokens / all forward passes
   (prefill included), at batch 1 and 16.
3. Forward time of the AR view as a function of batched tokens (1..512).

AR figures are medians over ROUNDS rounds of (HF, eager engine, compiled engine), in one process.
"""

import argparse
import json
import platform
import time
from pathlib import Path
from statistics import median

import torch

PROMPTS = [
    "The history of the Roman empire",
    "def quicksort(arr):",
    "Explain how a transformer language model works.",
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics are",
    "import numpy as np\n\ndef softmax(x):",
    "Write a short poem about autumn leaves.",
    "The main differences between TCP and UDP are",
]


# AR vs HF: ROUNDS rounds of (one HF run, one engine run); medians of each and of the per-round ratio.
# This VM's speed drifts by up to 30% over minutes, so the two sides are measured side by side.
ROUNDS = 7


def prompts_for(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + (" " * (i // len(PROMPTS))) for i in range(n)]


def bench_hf(model, tok, batch: int, new_tokens: int) -> float:
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts_for(batch), return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return batch * new_tokens / (time.perf_counter() - start)


def bench_engine(llm, batch: int, new_tokens: int, block_size: int | None = None) -> dict:
    from orthrus_engines import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, block_size=block_size)
    llm.generate(prompts_for(batch), SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts_for(batch), params)
    elapsed = time.perf_counter() - start
    tokens = sum(o.completion_tokens for o in outs)
    passes = sum(o.forward_passes for o in outs)
    accepted = sum(o.accepted_tokens for o in outs)
    cycles = tokens - accepted  # every verify cycle commits its accepted drafts plus one token
    return {
        "batch": batch,
        "tok_s": tokens / elapsed,
        "tpf": tokens / max(1, passes),
        "accepted_per_cycle": accepted / max(1, cycles),
    }


def bench_forward_time(llm, sizes: list[int], repeats: int = 5) -> dict[int, float]:
    """Milliseconds of one AR-view forward over T new tokens (one sequence, 64 cached tokens)."""
    from orthrus_engines import SamplingParams

    engine = llm.core
    out = {}
    for T in sizes:
        # A prompt no earlier request shares (no prefix-cache hit), stopped right after its prefill.
        prompt = list(range(1000 + 100 * len(out), 1065 + 100 * len(out)))
        seq = engine.add_request(f"fwd-{T}", prompt, SamplingParams(max_tokens=1000, ignore_eos=True))
        while seq.status.value != "running" or seq.in_prefill:
            engine.step()
        engine.pages.ensure(seq, seq.num_cached + T)
        block = [[seq.token_ids[-1]] + [200] * (T - 1)]
        engine.runner.verify([seq], block)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.runner.verify([seq], block)
            times.append(time.perf_counter() - start)
        engine.abort_request(seq.request_id)
        out[T] = 1000 * sorted(times)[len(times) // 2]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="docs/bench_engine.json")
    args = ap.parse_args()
    from orthrus_engines import LLM, SamplingParams
    from orthrus_engines.models.builtin import builtin_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(head="none", block_size=8)  # untrained twins, fixed K (bench_auto.py measures the shipped head and auto)
    n = args.tokens
    start = time.perf_counter()
    compiled = LLM(head="none", block_size=1, compile=True)
    for batch in (1, 2):  # compile the prefill and decode graphs, for one sequence and for several
        compiled.generate(prompts_for(batch), SamplingParams(max_tokens=3, ignore_eos=True))
    compile_s = time.perf_counter() - start
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                 "torch": torch.__version__, "new_tokens": n, "compile_warm_up_s": compile_s, "ar": [], "orthrus": []}
    print(f"compiled engine: load + compile {compile_s:.0f} s", flush=True)
    for batch in (1, 4, 16):
        rounds = [(bench_hf(hf, tok, batch, n), bench_engine(llm, batch, n, block_size=1)["tok_s"],
                   bench_engine(compiled, batch, n)["tok_s"]) for _ in range(ROUNDS)]
        row = {"batch": batch, "hf_tok_s": median(r[0] for r in rounds), "engine_tok_s": median(r[1] for r in rounds),
               "compiled_tok_s": median(r[2] for r in rounds), "ratio": median(r[1] / r[0] for r in rounds),
               "compiled_ratio": median(r[2] / r[0] for r in rounds),
               "rounds": [{"hf_tok_s": h, "engine_tok_s": e, "compiled_tok_s": c} for h, e, c in rounds]}
        res["ar"].append(row)
        print(f"AR batch {batch:2d}: HF {row['hf_tok_s']:7.1f} tok/s, engine {row['engine_tok_s']:7.1f} "
              f"({row['ratio']:.2f}x; per round {', '.join(f'{e / h:.2f}' for h, e, _ in rounds)}), compiled "
              f"{row['compiled_tok_s']:7.1f} ({row['compiled_ratio']:.2f}x; per round "
              f"{', '.join(f'{c / h:.2f}' for h, _, c in rounds)})", flush=True)
    del compiled
    del hf
    ar1 = res["ar"][0]["engine_tok_s"]
    res["ar_scaling_16_over_1"] = res["ar"][2]["engine_tok_s"] / ar1
    res["compiled_scaling_16_over_1"] = res["ar"][2]["compiled_tok_s"] / res["ar"][0]["compiled_tok_s"]
    for K in (4, 8, 16, 32):
        for batch in (1, 16):
            r = bench_engine(llm, batch, n, block_size=K)
            r["K"] = K
            r["vs_ar"] = r["tok_s"] / next(a["engine_tok_s"] for a in res["ar"] if a["batch"] == batch)
            res["orthrus"].append(r)
            print(f"Orthrus K={K:2d} batch {batch:2d}: {r['tok_s']:7.1f} tok/s, TPF {r['tpf']:.2f}, "
                  f"{r['vs_ar']:.2f}x AR", flush=True)
    res["forward_ms_by_tokens"] = bench_forward_time(llm, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    for T, ms in res["forward_ms_by_tokens"].items():
        print(f"forward {T:3d} tokens: {ms:7.2f} ms", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
