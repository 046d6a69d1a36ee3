"""`orthrus-serve bench`: statistics on hand-made records, argument parsing, and the stream readers on fakes.

No Ray and no servers here: the gRPC client and the HTTP transport are fakes.
"""

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from orthrus_serve.bench import RequestRecord, _grpc_one, _http_one, format_table, summarize
from orthrus_serve.cli import build_parser


def rec(ttft, latency, tokens, passes, itl=(), drafted=0, accepted=0, ok=True):
    return RequestRecord(ok=ok, ttft_s=ttft, latency_s=latency, completion_tokens=tokens, itl_s=list(itl),
                         forward_passes=passes, drafted_tokens=drafted, accepted_tokens=accepted,
                         error=None if ok else "boom")


def test_summarize_percentiles_tpot_tpf_failures():
    records = [rec(0.1, 1.1, 11, 5, itl=[0.1] * 3, drafted=10, accepted=6),   # TPOT (1.1-0.1)/10 = 0.1
               rec(0.2, 2.2, 21, 10, itl=[0.2] * 3, drafted=20, accepted=11),  # TPOT 2.0/20 = 0.1
               rec(0.3, 0.3, 1, 1, itl=[]),                                     # one token: no TPOT
               rec(0.4, 4.4, 41, 20, itl=[0.3] * 3),                            # TPOT 4.0/40 = 0.1
               rec(None, 0.5, 0, 0, ok=False)]
    s = summarize(records, wall_s=2.0)
    assert (s["requests"], s["successes"], s["failures"]) == (5, 4, 1)
    assert s["errors"] == ["boom"]
    assert s["output_tokens"] == 74
    assert s["output_tok_s"] == pytest.approx(37.0)
    assert s["request_s"] == pytest.approx(2.0)
    assert s["tpf"] == pytest.approx(74 / 36)
    assert (s["drafted_tokens"], s["accepted_tokens"]) == (30, 17)
    # TTFT over successes 0.1..0.4 s: linear interpolation percentiles
    assert s["ttft_ms"]["p50"] == pytest.approx(250.0)
    assert s["ttft_ms"]["p90"] == pytest.approx(370.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(397.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(250.0)
    for q in ("p50", "p90", "p99", "mean"):
        assert s["tpot_ms"][q] == pytest.approx(100.0)
    assert s["itl_ms"]["p50"] == pytest.approx(200.0)
    assert s["itl_ms"]["p99"] == pytest.approx(300.0)
    assert "failed 1" in format_table(s)


def test_summarize_empty_and_all_failed():
    s = summarize([rec(None, 0.1, 0, 0, ok=False)], wall_s=1.0)
    assert s["failures"] == 1 and s["successes"] == 0
    assert s["tpf"] is None and s["ttft_ms"]["p50"] is None and s["output_tok_s"] == 0.0
    format_table(s)
    assert summarize([], wall_s=0.0)["requests"] == 0


def test_tpot_property():
    assert rec(0.5, 1.5, 3, 2).tpot_s == pytest.approx(0.5)
    assert rec(0.5, 1.5, 1, 1).tpot_s is None
    assert rec(0.5, 1.5, 3, 2, ok=False).tpot_s is None


def test_cli_parses_bench():
    args = build_parser().parse_args(["bench", "--concurrency", "4", "--num-requests", "2"])
    assert args.command == "bench"
    assert (args.concurrency, args.num_requests, args.max_tokens, args.temperature) == (4, 2, 64, 0.0)
    assert args.address == "127.0.0.1:9000" and args.application == "orthrus"
    assert args.http is None and args.request_rate is None and args.json_path is None and not args.ignore_eos
    args = build_parser().parse_args(["bench", "--http", "http://h:8000", "--request-rate", "2.5", "--seed", "3",
                                      "--json", "out.json", "--ignore-eos", "--prompt-file", "p.txt"])
    assert (args.http, args.request_rate, args.seed, args.json_path) == ("http://h:8000", 2.5, 3, "out.json")
    assert args.ignore_eos and args.prompt_file == "p.txt"
    # the existing subcommands still parse
    assert build_parser().parse_args(["generate", "hi", "--stream"]).stream
    assert build_parser().parse_args(["up", "--model", "m"]).model == "m"


class FakeGrpcClient:
    def __init__(self, deltas):
        self.deltas, self.params = deltas, None

    async def generate_stream(self, prompt, **params):
        self.params = params
        for d in self.deltas:
            await asyncio.sleep(0.01)
            yield SimpleNamespace(**d)


def _delta(ids, n, finish="", fp=0):
    return dict(token_ids=ids, completion_tokens=n, finish_reason=finish, forward_passes=fp, cached_prompt_tokens=0,
                drafted_tokens=4, accepted_tokens=2, prompt_tokens=5)


def test_grpc_reader_on_fake_client():
    client = FakeGrpcClient([_delta([1], 1, fp=1), _delta([2, 3], 3, fp=2), _delta([4], 4, "length", fp=3)])
    r = asyncio.run(_grpc_one(client, "p", {"max_tokens": 4}))
    assert r.ok and r.completion_tokens == 4 and r.forward_passes == 3 and r.accepted_tokens == 2
    assert len(r.itl_s) == 2 and r.ttft_s > 0 and r.latency_s >= r.ttft_s
    assert client.params == {"max_tokens": 4}
    bad = asyncio.run(_grpc_one(FakeGrpcClient([_delta([], 0, "error")]), "p", {}))
    assert not bad.ok and "error" in bad.error


def test_http_reader_on_mock_transport():
    seen = {}

    def handler(request):
        seen.update(json.loads(request.content))
        chunks = [{"choices": [{"text": "a", "finish_reason": None}]},
                  {"choices": [{"text": "bc", "finish_reason": None}]},
                  {"choices": [{"text": "", "finish_reason": "length"}]},
                  {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "orthrus": {
                      "forward_passes": 2, "drafted_tokens": 3, "accepted_tokens": 2}}}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return await _http_one(c, "http://x/v1/completions", "p", {"max_tokens": 4, "ignore_eos": True})

    r = asyncio.run(go())
    assert seen["stream"] is True and seen["ignore_eos"] is True and seen["prompt"] == "p"
    assert seen["stream_options"] == {"include_usage": True}
    assert r.ok and r.completion_tokens == 4 and r.forward_passes == 2 and r.accepted_tokens == 2
    assert r.ttft_s is not None and len(r.itl_s) == 1
