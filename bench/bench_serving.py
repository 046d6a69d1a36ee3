"""Serving benchmark on the built-in model, CPU, everything measured in one run.

  .venv/bin/python bench/bench_serving.py [--out docs/bench_serving.json]

1. Overhead of the serving path: the same requests through the engine alone (AsyncEngine in this
   process), through gRPC and through HTTP (streaming), at concurrency 1 and 8: median TTFT and
   output tok/s.
2. A shared-prefix workload on two replicas: prefix-aware routing vs power-of-two-choices, cached
   prompt-token fraction and median TTFT.
"""

import argparse
import asyncio
import json
import socket
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

ENGINE = {"block_size": 1, "kv_cache_gb": 0.25}  # plain AR: the same engine work on every path
MAX_TOKENS, NUM_REQUESTS = 32, 16
SYSTEM = ("You are a careful assistant. Answer in one short paragraph, cite no sources, and keep a "
          "friendly tone. The user is a student preparing for an exam on European history. ") * 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def engine_alone(prompts: list[str], concurrency: int) -> dict:
    from orthrus_engines import AsyncEngine, SamplingParams

    engine = AsyncEngine(**ENGINE)
    sem, ttfts, tokens = asyncio.Semaphore(concurrency), {}, 0

    async def one(i: int, p: str) -> None:
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            async for d in engine.generate(f"r{i}", p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)):
                if d.token_ids and i not in ttfts:
                    ttfts[i] = time.perf_counter() - t0
                tokens += len(d.token_ids)

    await one(-1, "warm up")
    ttfts.clear()
    tokens = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t0
    engine.shutdown()
    return {"ttft_ms_p50": 1000 * statistics.median(ttfts.values()), "output_tok_s": tokens / wall}


def through_server(http: str | None, grpc_address: str, app: str, prompts_file: str, concurrency: int,
                   num_requests: int = NUM_REQUESTS) -> dict:
    from orthrus_serve.bench import run_bench, summarize

    args = SimpleNamespace(http=http, address=grpc_address, application=app, prompt_file=prompts_file,
                           num_requests=num_requests, concurrency=concurrency, request_rate=None,
                           max_tokens=MAX_TOKENS, temperature=0.0, seed=0, ignore_eos=True)
    records, wall = asyncio.run(run_bench(args))
    s = summarize(records, wall)
    assert s["failures"] == 0, s["errors"]
    return {"ttft_ms_p50": s["ttft_ms"]["p50"], "output_tok_s": s["output_tok_s"],
            "cached_prompt_fraction": s["cached_prompt_fraction"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/bench_serving.json")
    ap.add_argument("--only", choices=["overhead", "routing"], help="run one part (the other is kept from --out)")
    a = ap.parse_args()
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from orthrus_serve.app import GRPC_SERVICERS, build_app

    prompts = [f"Question {i}: explain topic number {i} of European history briefly." for i in range(NUM_REQUESTS)]
    with open("/tmp/orthrus_bench_prompts.txt", "w") as f:
        f.write("\n".join(prompts))
    # 7 long prefixes (different system prompts), 3 requests each, interleaved: a router that
    # remembers where each prefix went can send the 2nd and 3rd request of a group to its holder.
    # An odd number of groups: with an even one, plain alternation over 2 replicas would put every
    # request of a group on the same replica by accident.
    shared = [f"[Course {g}] " + SYSTEM + f"Question {r}: who was ruler number {g * 3 + r}?"
              for r in range(3) for g in range(7)]
    with open("/tmp/orthrus_bench_shared.txt", "w") as f:
        f.write("\n".join(shared))

    res: dict = {"max_tokens": MAX_TOKENS, "requests": NUM_REQUESTS, "engine_args": ENGINE, "overhead": []}
    if a.only == "routing":
        with open(a.out) as f:
            res = json.load(f)
    for c in (1, 8) if a.only != "routing" else ():
        res["overhead"].append({"concurrency": c, "path": "engine", **asyncio.run(engine_alone(prompts, c))})
        print(res["overhead"][-1], flush=True)

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=http_port),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
    grpc_address, base = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    serve.run(build_app({"app_name": "one", "engine": ENGINE}), name="one", route_prefix="/one")
    through_server(None, grpc_address, "one", "/tmp/orthrus_bench_prompts.txt", 1)  # warm up
    for c in (1, 8) if a.only != "routing" else ():
        for path, http in (("grpc", None), ("http", base + "/one")):
            r = through_server(http, grpc_address, "one", "/tmp/orthrus_bench_prompts.txt", c)
            eng = next(o for o in res["overhead"] if o["concurrency"] == c and o["path"] == "engine")
            res["overhead"].append({"concurrency": c, "path": path, **r,
                                    "tok_s_vs_engine": r["output_tok_s"] / eng["output_tok_s"]})
            print(res["overhead"][-1], flush=True)
    serve.delete("one")

    res["routing"] = []
    for kind in ("prefix", "pow2") if a.only != "overhead" else ():
        name = f"r{kind}"
        serve.run(build_app({"app_name": name, "engine": ENGINE, "num_replicas": 2, "router": {"kind": kind}}),
                  name=name, route_prefix=f"/{name}")
        time.sleep(3)  # routing stats reach the router
        args = dict(num_requests=len(shared))
        r = through_server(None, grpc_address, name, "/tmp/orthrus_bench_shared.txt", 2, **args)
        res["routing"].append({"router": kind, **r})
        print(res["routing"][-1], flush=True)
        serve.delete(name)
    serve.shutdown()
    ray.shutdown()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
