"""`orthrus-serve bench`: a streaming load generator (gRPC or HTTP /v1/completions) with latency statistics."""

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orthrus_serve.auth import add_api_key_argument, bearer, key_from_env

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in one paragraph how a transformer language model works.",
    "List three uses of a paperclip:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The main causes of the French Revolution were",
    "Translate to German: The weather is nice today.",
]


@dataclass
class RequestRecord:
    ok: bool = False
    ttft_s: float | None = None        # time to the first delta carrying tokens
    latency_s: float = 0.0              # end to end
    itl_s: list[float] = field(default_factory=list)  # per-token inter-token latencies
    # The request's counters (orthrus_engines.outputs.COUNTERS, by their names), from its last delta
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    forward_passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    error: str | None = None

    def set_counters(self, counters: dict[str, int]) -> None:
        for name, value in counters.items():
            setattr(self, name, value)

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.completion_tokens - 1)


def _pct(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _ms_stats(values_s: list[float]) -> dict:
    out = {f"p{q}": (None if (x := _pct(values_s, q)) is None else x * 1000.0) for q in (50, 90, 99)}
    out["mean"] = sum(values_s) / len(values_s) * 1000.0 if values_s else None
    return out


def summarize(records: list[RequestRecord], wall_s: float) -> dict:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    passes = sum(r.forward_passes for r in ok)
    return {
        "requests": len(records), "successes": len(ok), "failures": len(records) - len(ok),
        "wall_s": wall_s,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "request_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "ttft_ms": _ms_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": _ms_stats([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": _ms_stats([x for r in ok for x in r.itl_s]),
        "latency_ms": _ms_stats([r.latency_s for r in ok]),
        "forward_passes": passes,
        "tpf": out_tokens / passes if passes else None,
        "drafted_tokens": sum(r.drafted_tokens for r in ok),
        "accepted_tokens": sum(r.accepted_tokens for r in ok),
        "cached_prompt_fraction": (sum(r.cached_prompt_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok))),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def format_table(s: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"requests {s['requests']}  ok {s['successes']}  failed {s['failures']}  wall {s['wall_s']:.2f}s",
             f"{'metric':<12}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "latency_ms"):
        d = s[key]
        lines.append(f"{key:<12}" + "".join(f"{f(d[k]):>10}" for k in ("p50", "p90", "p99", "mean")))
    lines.append(f"output tok/s {f(s['output_tok_s'])}  request/s {f(s['request_s'])}  "
                 f"TPF {f(s['tpf'])}  accepted drafts {s['accepted_tokens']}/{s['drafted_tokens']}")
    lines += [f"error: {e}" for e in s["errors"]]
    return "\n".join(lines)


def _params(args) -> dict:
    p = {"max_tokens": args.max_tokens, "temperature": args.temperature, "ignore_eos": args.ignore_eos}
    if args.seed is not None:
        p["seed"] = args.seed
    return p


def _err(e: Exception) -> str:
    detail = e.details() if callable(getattr(e, "details", None)) else str(e)  # grpc errors: just the details
    return " ".join(f"{type(e).__name__}: {detail}".split())[:200]


async def _grpc_one(client, prompt: str, params: dict) -> RequestRecord:
    # Imported here, not at the top: orthrus_engines brings torch, which the CLI's other commands need not
    # load (run_bench imports it before its clock starts).
    from orthrus_engines.outputs import COUNTERS

    rec, t0 = RequestRecord(), time.perf_counter()
    last_t, last = None, None
    try:
        async for d in client.generate_stream(prompt, **params):
            now, n = time.perf_counter(), len(d.token_ids)
            if n:
                if rec.ttft_s is None:
                    rec.ttft_s = now - t0
                else:
                    rec.itl_s.append((now - last_t) / n)
                last_t = now
            last = d
        rec.latency_s = time.perf_counter() - t0
        if last is not None:  # the response's counter fields have the counters' names
            rec.set_counters({name: getattr(last, name) for name in COUNTERS})
        rec.ok = last is not None and last.finish_reason in ("stop", "length")
        if not rec.ok:
            rec.error = f"finish_reason={last.finish_reason if last is not None else None}"
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        rec.latency_s, rec.error = time.perf_counter() - t0, _err(e)
    return rec


async def _http_one(client, url: str, prompt: str, params: dict) -> RequestRecord:
    """SSE chunks carry text, not token ids: ITL uses each chunk's gap spread over the average tokens per chunk."""
    from orthrus_serve.openai_api import usage_counters  # brings torch: see _grpc_one

    rec, t0 = RequestRecord(), time.perf_counter()
    gaps, chunks, last_t, usage, finish = [], 0, None, None, None
    try:
        async with client.stream("POST", url, json={"prompt": prompt, "stream": True,
                                                  "stream_options": {"include_usage": True}, **params}) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or (data := line[5:].strip()) == "[DONE]":
                    continue
                now, chunk = time.perf_counter(), json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:200])
                usage = chunk.get("usage") or usage
                if not chunk["choices"]:  # the usage chunk
                    continue
                choice = chunk["choices"][0]
                if choice.get("text"):
                    chunks += 1
                    if rec.ttft_s is None:
                        rec.ttft_s = now - t0
                    else:
                        gaps.append(now - last_t)
                    last_t = now
                finish = choice.get("finish_reason") or finish
        rec.latency_s = time.perf_counter() - t0
        if usage:
            rec.set_counters(usage_counters(usage))
        per_chunk = max(rec.completion_tokens / chunks, 1.0) if chunks else 1.0
        rec.itl_s = [g / per_chunk for g in gaps]
        rec.ok = usage is not None and finish in ("stop", "length")
        if not rec.ok:
            rec.error = f"finish_reason={finish}"
    except Exception as e:  # noqa: BLE001
        rec.latency_s, rec.error = time.perf_counter() - t0, _err(e)
    return rec


async def run_bench(args) -> tuple[list[RequestRecord], float]:
    prompts = DEFAULT_PROMPTS
    if args.prompt_file:
        with open(args.prompt_file) as fh:
            prompts = [ln.rstrip("\n") for ln in fh if ln.strip()]
    import orthrus_serve.openai_api  # noqa: F401 - what the readers import (torch with it), before the clock starts

    rng = random.Random(args.seed)
    params, close = _params(args), None
    if args.http:
        import httpx
        key = args.api_key if args.api_key is not None else key_from_env()
        client = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None),
                                   headers={"Authorization": bearer(key)} if key else None)
        url = args.http.rstrip("/") + "/v1/completions"
        one, close = (lambda p: _http_one(client, url, p, params)), client.aclose
    else:
        from orthrus_serve.client import AsyncOrthrusClient
        client = AsyncOrthrusClient(args.address, application=args.application, api_key=args.api_key)
        one, close = (lambda p: _grpc_one(client, p, params)), client.close
    sem = asyncio.Semaphore(args.concurrency) if args.request_rate is None else None

    async def task(i: int) -> RequestRecord:
        if sem is None:
            return await one(prompts[i % len(prompts)])
        async with sem:
            return await one(prompts[i % len(prompts)])

    try:
        t0, tasks = time.perf_counter(), []
        for i in range(args.num_requests):
            tasks.append(asyncio.create_task(task(i)))
            if args.request_rate is not None and i + 1 < args.num_requests:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        records = list(await asyncio.gather(*tasks))
        return records, time.perf_counter() - t0
    finally:
        await close()


def add_arguments(p) -> None:
    p.add_argument("--address", default="127.0.0.1:9000", help="gRPC host:port")
    p.add_argument("--http", help="base URL, e.g. http://127.0.0.1:8000: use HTTP /v1/completions instead of gRPC")
    p.add_argument("--application", default="orthrus", help="gRPC application metadata")
    add_api_key_argument(p)
    p.add_argument("--prompt-file", help="one prompt per line (default: a built-in list)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8, help="fixed concurrency (ignored with --request-rate)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals in req/s; concurrency is then unbounded")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write the results as JSON")


def main(args) -> int:
    records, wall_s = asyncio.run(run_bench(args))
    summary = summarize(records, wall_s)
    print(format_table(summary))
    if args.json_path:
        cfg = {k: v for k, v in vars(args).items() if k not in ("json_path", "command", "api_key")}  # no secrets
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json_path, "w") as fh:
            json.dump({"config": cfg, "summary": summary,
                       "requests": [asdict(r) | {"tpot_s": r.tpot_s} for r in records]}, fh, indent=2)
    return 0 if summary["failures"] == 0 else 1
