"""The GPU check's Python part (scripts/gpu_check.sh runs it after the CUDA tests): one JSON and one
markdown table under --out.

1. kernels: the model's draft, verify and verify+draft passes with the Triton kernels vs the torch
   reference (fp32, tiny Qwen3): the largest absolute logit difference;
2. graphs: greedy tokens with CUDA graphs vs `enforce_eager=True` (fp32 and bf16): equal or not;
3. bf16 vs fp32: greedy match rate (tokens equal to fp32's, up to each request's first difference);
4. throughput: tokens/s of plain AR, the two-pass cycle at K = 2..8, the fused cycle at the K it allows,
   and `auto`, at 1, 4, 16 and 64 concurrent requests, on the built-in model (its converted weights and
   head when present; otherwise random weights at its shapes, SmolLM2-135M) and on a tiny
   official-format Qwen3.

`--device cpu --quick`: tiny models, few plans and tokens, so that a CPU test keeps this script alive.
Random-weight models accept drafts at random rates: their tokens/s measure pass costs, not a head.
"""

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton's interpreter must be chosen before anything imports Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False)
TINY_QWEN3 = dict(TINY, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def write_random_orthrus(path: Path, family: str, cfg: dict, seed: int = 0) -> Path:
    """An official-format Orthrus checkpoint with random weights (transformers' init, std 0.02): the base,
    `*_diff` twins (AR + noise), `model_type: orthrus`, `block_size` 8, a causal anchor view."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, bos_token_id=None, eos_token_id=None, pad_token_id=None, **cfg)
    AutoModelForCausalLM.from_config(config).float().save_pretrained(path)
    tensors = load_file(str(path / "model.safetensors"))
    for name in list(tensors):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            if f".self_attn.{part}." in name:
                t = tensors[name]
                tensors[name.replace(f".{part}.", f".{part}_diff.")] = t + 0.1 * t.std() * torch.randn_like(t)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    raw.update(model_type="orthrus", base_model_type=family, block_size=8, mask_token_id=raw["vocab_size"] - 1,
               anchor_view="causal")
    (path / "config.json").write_text(json.dumps(raw))
    return path


def builtin_or_random(work: Path, quick: bool) -> tuple[str | None, str]:
    """(model directory, what it is): the converted built-in model if this machine has it, else random weights."""
    if not quick:
        from orthrus_engines.models.builtin import cache_root

        if (cache_root() / "smollm2-135m-instruct" / "model.safetensors").exists():
            return None, "built-in SmolLM2-135M-Instruct with its shipped head"
    cfg = TINY if quick else SMOLLM2_135M
    path = write_random_orthrus(work / "builtin-shapes", "llama", cfg)
    return str(path), "random weights at " + ("tiny shapes (--quick)" if quick else "SmolLM2-135M shapes")


def prompts(n: int, vocab: int, length: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(1, vocab - 2, (length,), generator=g).tolist() for _ in range(n)]


ENGINE_DEFAULTS = dict(kv_cache_gb=4.0, max_num_seqs=64)  # --quick: a few small passes (the auto calibration too)
QUICK_DEFAULTS = dict(kv_cache_gb=0.05, max_num_seqs=4, max_num_batched_tokens=32)


def engine(model, device: str, **kw):
    from orthrus_engines import LLM

    return LLM(model, device=device, **ENGINE_DEFAULTS, **kw)


def release(llm) -> None:
    llm.close()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def greedy(model, device: str, ps, tokens: int, **kw) -> list[list[int]]:
    from orthrus_engines import SamplingParams

    llm = engine(model, device, **kw)
    out = [list(o.token_ids) for o in llm.generate(ps, SamplingParams(max_tokens=tokens, ignore_eos=True))]
    release(llm)
    return out


def check_kernels(model: str, device: str) -> dict:
    """Largest |logit| difference, triton vs torch, over a ragged batch's draft, verify and verify+draft."""
    from orthrus_engines import SamplingParams

    ps = [[1, 2, 3, 4, 5], [6, 5, 4], list(range(8)) * 5]
    results = []
    for backend in ("torch", "triton"):
        llm = engine(model, device, block_size=4, dtype="float32", attention_backend=backend, enforce_eager=True)
        core = llm.core
        seqs = [core.add_request(f"r{i}", p, SamplingParams(max_tokens=16)) for i, p in enumerate(ps)]
        for _ in range(8):  # prefill (bounded: a failed pass leaves a sequence in prefill)
            if not any(s.in_prefill for s in seqs):
                break
            core.step()
        assert not any(s.in_prefill for s in seqs), "prefill failed"
        for s in seqs:
            assert core.pages.ensure(s, s.num_cached + 12)
        blocks = [[p[-1]] + d for p, d in zip(ps, ([1, 2], [], [3]))]
        ar, hidden = core.runner.verify_and_draft(seqs, blocks, [3, 2, 0])
        results.append([core.runner.draft(seqs, [4, 2, 3]), ar, core.runner.logits(hidden, [0, 1]),
                        core.runner.verify(seqs, blocks)])
        release(llm)
    diff = max(float((a - b).abs().max()) for a, b in zip(*results))
    return {"max_abs_logit_diff": diff, "ok": diff < 1e-3}


def match_rate(want: list[list[int]], got: list[list[int]]) -> float:
    """Tokens equal to `want`'s up to each request's first difference, over all of `want`'s tokens."""
    same = 0
    for w, g in zip(want, got):
        same += next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
    return same / max(1, sum(len(w) for w in want))


def check_graphs_and_bf16(model: str, device: str, vocab: int, tokens: int, requests: int) -> dict:
    ps = prompts(requests, vocab)
    out = {}
    for dtype in ("float32", "bfloat16"):
        eager = greedy(model, device, ps, tokens, dtype=dtype, block_size=3, enforce_eager=True)
        graphs = greedy(model, device, ps, tokens, dtype=dtype, block_size=3)  # the fused cycle: K = 3
        out[dtype] = {"eager": eager, "graphs": graphs}
    return {
        "graphs_equal_eager_fp32": out["float32"]["graphs"] == out["float32"]["eager"],
        "graphs_equal_eager_bf16": out["bfloat16"]["graphs"] == out["bfloat16"]["eager"],
        "graphs_match_rate_bf16": match_rate(out["bfloat16"]["eager"], out["bfloat16"]["graphs"]),
        "bf16_vs_fp32_match_rate": match_rate(out["float32"]["graphs"], out["bfloat16"]["graphs"]),
    }


def plans(quick: bool, fused_ks: list[int]) -> list[tuple[str, dict]]:
    ks = [2] if quick else list(range(2, 9))
    out = [("AR", dict(block_size=1))]
    out += [(f"two-pass K={k}", dict(block_size=k, fused_cycle=False)) for k in ks]
    out += [(f"fused K={k}", dict(block_size=k, fused_cycle=True)) for k in fused_ks]
    return out + [("auto", dict(block_size="auto"))]


def throughput(model: str, device: str, vocab: int, quick: bool, deadline: float) -> list[dict]:
    from orthrus_engines import SamplingParams
    from orthrus_engines.engine.orthrus_step import fused_block_limit

    concurrency = [2] if quick else [1, 4, 16, 64]
    tokens = 4 if quick else 64
    rows = []
    for name, kw in plans(quick, [2] if quick else list(range(2, fused_block_limit(8) + 1))):
        if time.monotonic() > deadline:
            rows.append({"plan": name, "skipped": "time budget"})
            continue
        llm = engine(model, device, **kw)
        for n in concurrency:
            ps = prompts(n, vocab)
            llm.generate(ps, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up: graphs of these shapes
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outs = llm.generate(ps, SamplingParams(max_tokens=tokens, ignore_eos=True))
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            generated = sum(len(o.token_ids) for o in outs)
            rows.append({"plan": name, "concurrency": n, "tokens": generated, "seconds": round(seconds, 4),
                         "tok_s": round(generated / seconds, 1),
                         "tokens_per_pass": round(generated / max(1, sum(o.forward_passes for o in outs)), 3),
                         "accepted": sum(o.accepted_tokens for o in outs)})
        release(llm)
    return rows


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']}", "",
             f"torch {report['versions']['torch']}, triton {report['versions'].get('triton')}, "
             f"transformers {report['versions']['transformers']}", ""]
    for name, m in report["models"].items():
        lines += [f"## {name}: {m['what']}", "", f"- kernels (triton vs torch, fp32): {m['kernels']}",
                  f"- graphs vs eager, bf16 vs fp32: {m['checks']}", "",
                  "| plan | concurrency | tok/s | tokens/pass | accepted |", "|---|---|---|---|---|"]
        for r in m["throughput"]:
            if "skipped" in r:
                lines.append(f"| {r['plan']} | skipped: {r['skipped']} | | | |")
            else:
                lines.append(f"| {r['plan']} | {r['concurrency']} | {r['tok_s']} | {r['tokens_per_pass']} "
                             f"| {r['accepted']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny models, few plans: the CPU smoke test")
    p.add_argument("--budget-s", type=float, default=330.0, help="throughput plans past this are skipped")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    if args.quick:
        torch.set_num_threads(1)  # tiny passes: one thread is fastest
        ENGINE_DEFAULTS.clear()
        ENGINE_DEFAULTS.update(QUICK_DEFAULTS)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_models"))  # the random checkpoints stay out of --out
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {"device": args.device, "quick": args.quick,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "versions": {"torch": torch.__version__, "triton": triton_version,
                           "transformers": transformers.__version__}, "models": {}}
    builtin, what = builtin_or_random(work, args.quick)
    qwen3_cfg = TINY if args.quick else TINY_QWEN3
    qwen3 = str(write_random_orthrus(work / "qwen3-tiny", "qwen3", qwen3_cfg, seed=1))
    models = [("builtin", builtin, what, (TINY if args.quick else SMOLLM2_135M)["vocab_size"]),
              ("qwen3-tiny", qwen3, "tiny official-format Qwen3, random weights", qwen3_cfg["vocab_size"])]
    for i, (name, path, what, vocab) in enumerate(models):
        m = {"what": what}
        m["kernels"] = check_kernels(path, args.device) if name == "qwen3-tiny" else "see qwen3-tiny"
        if args.quick and name == "builtin":  # --quick: tiny shapes both, the checks once
            m["checks"] = "see qwen3-tiny"
        else:
            m["checks"] = check_graphs_and_bf16(path, args.device, vocab, *((4, 2) if args.quick else (48, 16)))
        share = (args.budget_s - (time.monotonic() - start)) / (len(models) - i)
        m["throughput"] = throughput(path, args.device, vocab, args.quick, time.monotonic() + share)
        report["models"][name] = m
    shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
