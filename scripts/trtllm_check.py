"""The GPU half of scripts/trtllm_check.sh: Orthrus in TensorRT-LLM against plain AR and the torch backend.

First the replica-engine contract (tests/engines/test_replica_engine_contract.py) on both backends, the
trtllm one on `--model` (TrtllmAsyncEngine: streaming, abort, stats, model info, input errors, prefix events).
For TP in (1, 2) and CUDA graphs on/off: greedy output of the ORTHRUS mode equals TensorRT-LLM without
speculation on the 20 evaluation prompts; tokens/s of both and of this project's torch engine (TP 1).
One JSON (`--out`) and one table on stdout. Needs tensorrt_llm (patched) and the GPUs.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "engines/orthrus_engines/data/prompts_eval.txt"
CONTRACT = "tests/engines/test_replica_engine_contract.py"


def run_contract(model: str) -> dict:
    """The contract module with the trtllm backend enabled on `model`; its exit code and pytest's summary."""
    env = dict(os.environ, ORTHRUS_TRTLLM_MODEL=model)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", CONTRACT], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    lines = proc.stdout.strip().splitlines()
    return {"exit_code": proc.returncode, "summary": lines[-1] if lines else ""}


def run_trtllm(model: str, prompts: list[str], tp: int, cuda_graphs: bool, spec, max_tokens: int):
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import CudaGraphConfig

    llm = LLM(model=model, tensor_parallel_size=tp, speculative_config=spec,
              cuda_graph_config=CudaGraphConfig() if cuda_graphs else None)
    try:
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        seconds = time.perf_counter() - start
    finally:
        llm.shutdown()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return tokens, sum(map(len, tokens)) / seconds


def run_torch(model: str, head: str | None, prompts: list[str], max_tokens: int) -> float:
    from orthrus_engines import LLM, SamplingParams

    llm = LLM(model=model, head=head)
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)  # ours: RequestOutput.token_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--head", default=None)
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="trtllm_check.json")
    args = ap.parse_args()

    from orthrus_engines import trtllm

    trtllm.register()
    from orthrus_engines.trtllm.config import OrthrusDecodingConfig

    contract = run_contract(args.model)
    prompts = [p for p in PROMPTS.read_text().splitlines() if p.strip()][:20]
    spec = OrthrusDecodingConfig(max_draft_len=args.draft_len, speculative_model=args.model, head_path=args.head)
    rows = []
    for tp in (1, 2):
        for graphs in (False, True):
            ar, ar_tps = run_trtllm(args.model, prompts, tp, graphs, None, args.max_tokens)
            ort, ort_tps = run_trtllm(args.model, prompts, tp, graphs, spec, args.max_tokens)
            rows.append({"tp": tp, "cuda_graphs": graphs, "greedy_equal": sum(a == b for a, b in zip(ar, ort)),
                         "prompts": len(prompts), "ar_tok_s": round(ar_tps, 1), "orthrus_tok_s": round(ort_tps, 1)})
    torch_tps = run_torch(args.model, args.head, prompts, args.max_tokens)
    import tensorrt_llm  # imported above by run_trtllm; here for its version

    result = {"tensorrt_llm_version": tensorrt_llm.__version__, "pinned_release": trtllm.RELEASE,
              "code_read_at_commit": trtllm.UPSTREAM_COMMIT, "draft_len": args.draft_len, "rows": rows,
              "torch_backend_tok_s": round(torch_tps, 1), "contract_tests": contract}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| TP | CUDA graphs | greedy = AR | AR tok/s | Orthrus tok/s | torch backend tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['cuda_graphs']} | {r['greedy_equal']}/{r['prompts']} | {r['ar_tok_s']} | "
              f"{r['orthrus_tok_s']} | {torch_tps:.1f} |")
    print(f"contract tests: {contract['summary']}")
    if any(r["greedy_equal"] != r["prompts"] for r in rows):
        raise SystemExit("greedy output differs from plain AR")
    if contract["exit_code"] != 0:
        raise SystemExit("the replica-engine contract tests failed")


if __name__ == "__main__":
    main()
