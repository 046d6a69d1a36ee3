"""Serving benchmark on the built-in model, CPU, everything measured in one run.

  .venv/bin/python bench/bench_serving.py [--out docs/bench_serving.json]

1. Overhead of the serving path: the same requests through the engine alone (AsyncEngine in this
   process), through gRPC and through HTTP (streaming), at concurrency 1 and 8: median TTFT and
   output tok/s.
2. A shared-prefix workload on two replicas: prefix-aware routing vs power-of-two-choices, cached
   prompt-token fraction and median TTFT.
3. What the API features cost (HTTP, one replica with the default engine: the built-in head, drafting on):
   logprobs on vs off (output tok/s), one n = 4 request vs the same with n = 1 (wall time), structured
   output (a JSON schema) vs free text (seconds per output token). Requests one at a time, the two
   variants interleaved per prompt so drift hits both alike.
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


FEATURE_PROMPTS = [f"Describe city number {i} of Europe in a few sentences." for i in range(12)]
FEATURE_TOKENS = 64
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                                           "population": {"type": "integer"}},
          "required": ["name", "country", "population"], "additionalProperties": False}


def timed_post(http, path: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = http.post(path, json=body)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()


def api_features(base: str) -> dict:
    """Each feature against the same requests without it (module docstring, part 3)."""
    import httpx

    res: dict = {}
    with httpx.Client(base_url=base, timeout=600) as http:
        timed_post(http, "/v1/completions", {"prompt": "warm up", "max_tokens": 8})
        plain = {"max_tokens": FEATURE_TOKENS, "temperature": 0, "ignore_eos": True}
        wall, tokens, pairs = {"off": 0.0, "on": 0.0}, {"off": 0, "on": 0}, []
        for i, p in enumerate(FEATURE_PROMPTS):
            pair = {}
            for mode, extra in (("off", {}), ("on", {"logprobs": 5}))[:: 1 if i % 2 else -1]:  # order alternates
                dt, r = timed_post(http, "/v1/completions", {"prompt": p, **plain, **extra})
                wall[mode] += dt
                tokens[mode] += r["usage"]["completion_tokens"]
                pair[mode] = r["usage"]["completion_tokens"] / dt
            pairs.append(pair["on"] / pair["off"])
        tok_s = {m: tokens[m] / wall[m] for m in wall}
        res["logprobs"] = {"tok_s_off": tok_s["off"], "tok_s_on": tok_s["on"], "on_vs_off": tok_s["on"] / tok_s["off"],
                           "on_vs_off_median": statistics.median(pairs)}
        print(res["logprobs"], flush=True)

        sampled = {"max_tokens": FEATURE_TOKENS, "temperature": 0.8, "ignore_eos": True}
        times: dict[int, list[float]] = {1: [], 4: []}
        for i, p in enumerate(FEATURE_PROMPTS):
            for n in (1, 4)[:: 1 if i % 2 else -1]:
                times[n].append(timed_post(http, "/v1/completions", {"prompt": p, **sampled, "n": n, "seed": i})[0])
        ratios = [b / a for a, b in zip(times[1], times[4])]
        res["n4"] = {"wall_s_n1": sum(times[1]), "wall_s_n4": sum(times[4]), "n4_vs_n1": sum(times[4]) / sum(times[1]),
                     "n4_vs_n1_median": statistics.median(ratios)}
        print(res["n4"], flush=True)

        fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": PERSON}}
        per_token: dict[str, list[float]] = {"free": [], "json": []}
        for i, p in enumerate(FEATURE_PROMPTS):
            for mode, extra in (("free", {}), ("json", {"response_format": fmt}))[:: 1 if i % 2 else -1]:
                body = {"messages": [{"role": "user", "content": p}], "max_tokens": FEATURE_TOKENS, "temperature": 0,
                        **extra}
                dt, r = timed_post(http, "/v1/chat/completions", body)
                per_token[mode].append(dt / max(1, r["usage"]["completion_tokens"]))
        s_tok = {m: statistics.mean(v) for m, v in per_token.items()}
        res["structured"] = {"s_per_token_free": s_tok["free"], "s_per_token_json": s_tok["json"],
                             "json_vs_free": s_tok["json"] / s_tok["free"],
                             "json_vs_free_median": statistics.median(j / f for f, j in zip(*per_token.values()))}
        print(res["structured"], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/bench_serving.json")
    ap.add_argument("--only", choices=["overhead", "routing", "features"],
                    help="run one part (the others are kept from --out)")
    a = ap.parse_args()
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from orthrus_serve import grpc_bind
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
    parts = {a.only} if a.only else {"overhead", "routing", "features"}
    if a.only:
        with open(a.out) as f:
            res = json.load(f)
    if "overhead" in parts:
        res["overhead"] = []
    for c in (1, 8) if "overhead" in parts else ():
        res["overhead"].append({"concurrency": c, "path": "engine", **asyncio.run(engine_alone(prompts, c))})
        print(res["overhead"][-1], flush=True)

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env=grpc_bind.runtime_env("127.0.0.1"))
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=http_port),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
    grpc_address, base = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    if "features" in parts:  # the default engine: the built-in head, drafting on
        serve.run(build_app({"app_name": "feat", "engine": {"kv_cache_gb": 0.25}}), name="feat", route_prefix="/feat")
        res["features"] = api_features(base + "/feat")
        serve.delete("feat")
    if "overhead" in parts:
        serve.run(build_app({"app_name": "one", "engine": ENGINE}), name="one", route_prefix="/one")
        through_server(None, grpc_address, "one", "/tmp/orthrus_bench_prompts.txt", 1)  # warm up
        for c in (1, 8):
            for path, http in (("grpc", None), ("http", base + "/one")):
                r = through_server(http, grpc_address, "one", "/tmp/orthrus_bench_prompts.txt", c)
                eng = next(o for o in res["overhead"] if o["concurrency"] == c and o["path"] == "engine")
                res["overhead"].append({"concurrency": c, "path": path, **r,
                                        "tok_s_vs_engine": r["output_tok_s"] / eng["output_tok_s"]})
                print(res["overhead"][-1], flush=True)
        serve.delete("one")

    if "routing" in parts:
        res["routing"] = []
    for kind in ("prefix", "pow2") if "routing" in parts else ():
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
