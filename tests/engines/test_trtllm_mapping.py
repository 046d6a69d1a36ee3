"""orthrus_engines.trtllm.mapping on CPU: our SamplingParams / EngineArgs -> TensorRT-LLM's keyword arguments,
TensorRT-LLM's outputs, iteration stats and KV-cache events -> ours. The TensorRT-LLM objects here are
SimpleNamespaces shaped like its CompletionOutput / Logprob / perf metrics and dicts shaped like its stats
and event JSON: these test our code, not TensorRT-LLM."""

import importlib.util
from types import SimpleNamespace as NS

import pytest

import orthrus_engines.trtllm as trtllm
from orthrus_engines.config import EngineArgs
from orthrus_engines.engine.replica import STATS_KEYS, build_replica_engine
from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.outputs import TokenLogprob
from orthrus_engines.prefix_hash import page_hashes
from orthrus_engines.sampling_params import SamplingParams
from orthrus_engines.trtllm import mapping as m
from orthrus_serve.app import engine_options, replica_bundles
from orthrus_serve.config import ServeConfig

no_trtllm = pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm installed")


# -- sampling params ----------------------------------------------------------------------------------
def test_greedy_is_temperature_zero_and_ignores_sampling_knobs():
    kw = m.sampling_kwargs(SamplingParams(max_tokens=9, top_p=0.5, top_k=3, seed=4))
    assert kw == {"max_tokens": 9, "ignore_eos": False, "detokenize": True, "return_perf_metrics": True,
                  "temperature": 0.0}


def test_sampling_fields_map_by_name():
    p = SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=3, stop=["\n\n"],
                       stop_token_ids=[2, 7], ignore_eos=True, logprobs=3)
    kw = m.sampling_kwargs(p)
    assert kw == {"max_tokens": 5, "ignore_eos": True, "detokenize": True, "return_perf_metrics": True,
                  "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["\n\n"],
                  "stop_token_ids": [2, 7], "logprobs": 3}
    off = m.sampling_kwargs(SamplingParams(temperature=1.0, top_k=-1))  # off values are left out
    assert "top_p" not in off and "top_k" not in off and "seed" not in off
    assert m.sampling_kwargs(SamplingParams(logprobs=0))["logprobs"] == 1  # TensorRT-LLM's 0 means none


@pytest.mark.parametrize("fields, field", [({"logits_processors": [lambda h, x: x]}, "logits_processors"),
                                           ({"block_size": 4}, "block_size"),
                                           ({"use_diffusion": False}, "use_diffusion")])
def test_unmappable_sampling_fields_are_refused_by_name(fields, field):
    with pytest.raises(OrthrusInputError) as e:
        m.sampling_kwargs(SamplingParams(**fields))
    assert e.value.field == field


def test_params_are_checked_again():
    p = SamplingParams()
    p.top_p = 0.0
    with pytest.raises(OrthrusInputError) as e:
        m.sampling_kwargs(p)
    assert e.value.field == "top_p"


# -- engine args --------------------------------------------------------------------------------------
def kwargs(**over):
    return m.engine_kwargs(EngineArgs(**over), "/m", "/t", 8, 4096, None, "causal")


def test_engine_kwargs_map_our_settings():
    kw = m.engine_kwargs(EngineArgs(page_size=32, max_num_seqs=8, max_num_batched_tokens=512, dtype="bfloat16"),
                         "/m", "/t", 8, 2048, "/h.safetensors", "causal")
    assert kw["kv_cache_config"] == {"tokens_per_block": 32, "enable_block_reuse": True,
                                     "event_buffer_max_size": m.KV_EVENT_BUFFER,
                                     "free_gpu_memory_fraction": m.KV_CACHE_FRACTION}
    assert kw["speculative_config"] == {"max_draft_len": 7, "speculative_model": "/m",
                                        "head_path": "/h.safetensors", "anchor_view": "causal"}
    assert (kw["model"], kw["tokenizer"], kw["max_batch_size"], kw["max_num_tokens"], kw["max_seq_len"],
            kw["dtype"], kw["tensor_parallel_size"]) == ("/m", "/t", 8, 512, 2048, "bfloat16", 1)
    assert kw["enable_iter_perf_stats"] and "orchestrator_type" not in kw


def test_tensor_parallel_runs_on_the_ray_orchestrator():
    assert kwargs(tensor_parallel_size=2)["orchestrator_type"] == "ray"
    assert m.worker_bundle_indices(3) == "1,2,3"


def test_no_prefix_cache_asks_for_no_events():
    cfg = kwargs(enable_prefix_cache=False)["kv_cache_config"]
    assert not cfg["enable_block_reuse"] and cfg["event_buffer_max_size"] == 0


def test_block_size_maps_to_draft_len():
    assert m.draft_len(1) is None and m.draft_len(4) == 3 and m.draft_len(8) == 7
    assert m.engine_kwargs(EngineArgs(), "/m", "/t", 1, 64, None, "diffusion")["speculative_config"] is None
    with pytest.raises(OrthrusInputError, match="block_size"):
        m.draft_len(3)


@pytest.mark.parametrize("over, field", [({"num_pages": 10}, "num_pages"), ({"kv_cache_gb": 1.0}, "kv_cache_gb"),
                                         ({"compile": True}, "compile"), ({"attention_backend": "torch"},
                                                                          "attention_backend"),
                                         ({"device": "cpu"}, "device"), ({"tensor_parallel_size": 0},
                                                                         "tensor_parallel_size")])
def test_unmappable_engine_args_are_refused_by_name(over, field):
    with pytest.raises(OrthrusInputError) as e:
        kwargs(**over)
    assert e.value.field == field


# -- outputs ------------------------------------------------------------------------------------------
def completion(ids, text, reason=None, drafted=None, accepted=None, reused=None, logprobs=None):
    perf = NS(speculative_decoding=NS(total_draft_tokens=drafted, total_accepted_draft_tokens=accepted),
              kv_cache_metrics=NS(num_reused_blocks=reused))
    return NS(token_ids=ids, text=text, finish_reason=reason, logprobs=logprobs or [],
              request_perf_metrics=perf if drafted is not None or reused is not None else None)


def test_cumulative_outputs_become_deltas_that_add_up():
    state = m.StreamState("r", prompt_tokens=40, page_size=16)
    steps = [completion([5], "a"), completion([5, 6, 7, 8], "abcd", drafted=6, accepted=3, reused=2),
             completion([5, 6, 7, 8, 9], "abcde", reason="length")]  # the final one reports no metrics
    deltas = [m.delta_from_output(state, c, i == 2) for i, c in enumerate(steps)]
    assert [d.token_ids for d in deltas] == [[5], [6, 7, 8], [9]]
    assert [d.text for d in deltas] == ["a", "bcd", "e"]
    assert [d.finished for d in deltas] == [False, False, True] and deltas[-1].finish_reason == "length"
    assert [d.completion_tokens for d in deltas] == [1, 4, 5]
    last = deltas[-1]
    assert (last.prompt_tokens, last.cached_prompt_tokens, last.drafted_tokens, last.accepted_tokens,
            last.forward_passes) == (40, 32, 6, 3, 0)  # totals kept where the final output does not repeat them


@pytest.mark.parametrize("reason, ours, error", [("stop", "stop", False), ("length", "length", False),
                                                 ("cancelled", "abort", False), ("timeout", "error", True),
                                                 (None, "stop", False)])
def test_finish_reasons(reason, ours, error):
    d = m.delta_from_output(m.StreamState("r", 3, 16), completion([1], "x", reason), True)
    assert d.finish_reason == ours and (d.error is not None) == error


def test_tokens_already_sent_stay_sent():
    state = m.StreamState("r", 3, 16)
    m.delta_from_output(state, completion([1, 2, 3], "abc"), False)
    d = m.delta_from_output(state, completion([1], "a", "stop"), True)  # a stop sequence cut at the end
    assert d.token_ids == [] and d.text == "" and d.completion_tokens == 3 and d.finish_reason == "stop"


def test_an_abort_finishes_with_nothing_new():
    state = m.StreamState("r", 3, 16)
    m.delta_from_output(state, completion([4, 5], "hi"), False)
    d = m.delta_from_output(state, NS(token_ids=[], text="", logprobs=[], finish_reason="cancelled"), False,
                            aborted=True)
    assert (d.token_ids, d.finished, d.finish_reason, d.completion_tokens) == ([], True, "abort", 2)


def test_logprobs_from_ranked_dicts_and_floats():
    lp = lambda v, r: NS(logprob=v, rank=r)  # noqa: E731 - TensorRT-LLM's Logprob
    entries = [{7: lp(-0.1, 1), 3: lp(-2.0, 2), 9: lp(-3.0, 3)}, {4: lp(-0.5, 1), 8: lp(-4.0, 5)}]
    state = m.StreamState("r", 3, 16, num_logprobs=2)
    d = m.delta_from_output(state, completion([7, 8], "ab", logprobs=entries), False)
    assert d.logprobs == [TokenLogprob(7, -0.1, [(7, -0.1), (3, -2.0)]), TokenLogprob(8, -4.0, [(4, -0.5), (8, -4.0)])]
    state = m.StreamState("r", 3, 16, num_logprobs=0)
    d = m.delta_from_output(state, completion([7], "a", logprobs=[-0.25]), False)
    assert d.logprobs == [TokenLogprob(7, -0.25, [])]
    assert m.delta_from_output(m.StreamState("r", 3, 16), completion([7], "a"), False).logprobs is None


# -- stats --------------------------------------------------------------------------------------------
STAT = {"numActiveRequests": 3, "numQueuedRequests": 2, "kvCacheStats": {"maxNumBlocks": 100, "freeNumBlocks": 40,
                                                                        "usedNumBlocks": 60, "tokensPerBlock": 32},
        "specDecodingStats": {"numDraftTokens": 20, "numAcceptedTokens": 15}}


def test_stats_from_an_iteration():
    s = m.stats_from_iteration(STAT, in_flight=5, generated=77)
    assert set(STATS_KEYS) <= set(s)
    assert (s["num_running"], s["num_waiting"], s["kv_usage"], s["num_pages"], s["num_free_pages"],
            s["num_generated_tokens"]) == (3, 2, 0.6, 100, 40, 77)
    assert (s["iteration_draft_tokens"], s["iteration_accepted_tokens"]) == (20, 15)
    assert m.stats_from_iteration(STAT, in_flight=2, generated=0)["num_running"] == 2  # never more than submitted


def test_an_idle_engine_reports_nothing_held_whatever_the_last_iteration_said():
    s = m.stats_from_iteration(STAT, in_flight=0, generated=5)
    assert (s["num_running"], s["num_waiting"], s["kv_usage"], s["num_free_pages"]) == (0, 0, 0.0, 100)
    none = m.stats_from_iteration(None, in_flight=1, generated=0)  # before the first iteration
    assert (none["num_running"], none["num_waiting"], none["kv_usage"]) == (0, 1, 0.0)


# -- KV-cache events -> prefix events -----------------------------------------------------------------
def block(trt_hash: int, tokens: list[int]) -> dict:
    return {"type": "stored_block", "block_hash": trt_hash, "cache_level": 0, "priority": 35,
            "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in tokens]}


def stored(parent, *blocks) -> dict:
    return {"event_id": 1, "window_size": 4096,
            "data": {"type": "stored", "parent_hash": parent, "blocks": list(blocks)}}


def test_stored_blocks_get_our_page_hashes():
    page, seed = 4, "f" * 32
    tokens = list(range(10, 26))  # four pages
    mapper = m.PrefixEventMapper(seed, page)
    first = mapper.apply(stored(None, block(101, tokens[0:4]), block(102, tokens[4:8])))
    later = mapper.apply(stored(102, block(103, tokens[8:12]), block(104, tokens[12:16])))
    ours = page_hashes(tokens, page, seed)
    assert first == [("stored", ours[:2])] and later == [("stored", ours[2:])]
    removed = mapper.apply({"event_id": 2, "data": {"type": "removed", "block_hashes": [104, 103, 999]}})
    assert removed == [("removed", [ours[3], ours[2]])] and set(mapper.ours) == {101, 102}


def test_blocks_that_cannot_be_named_are_skipped():
    mapper = m.PrefixEventMapper("s" * 32, 4)
    assert mapper.apply(stored(555, block(1, [1, 2, 3, 4]))) == []  # its parent was never seen
    assert mapper.apply(stored(None, block(2, [1, 2, 3]), block(3, [4, 5, 6, 7]))) == []  # not a full page
    assert mapper.apply({"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [9, 0]}}) == []
    assert mapper.apply({"event_id": 4, "data": {"type": "updated", "block_hash": 2}}) == []
    assert mapper.ours == {}


# -- serving: the backend choice ----------------------------------------------------------------------
@no_trtllm
def test_building_a_trtllm_replica_engine_names_the_missing_package():
    with pytest.raises(OrthrusInputError, match="tensorrt_llm") as e:
        build_replica_engine(None, None, {"backend": "trtllm"})
    assert e.value.field == "backend"


def test_trtllm_replica_placement_group(monkeypatch):
    monkeypatch.setattr(trtllm, "tensorrt_llm_available", lambda: True)  # the config check only
    cfg = ServeConfig(engine={"backend": "trtllm", "tensor_parallel_size": 2}, replica_num_gpus=2,
                      replica_num_cpus=0.5)
    assert replica_bundles(cfg) == [{"CPU": 0.5}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    opts = engine_options(cfg)
    assert opts["ray_actor_options"]["num_gpus"] == 0 and opts["placement_group_strategy"] == "STRICT_PACK"
    assert len(opts["placement_group_bundles"]) == 3
    with pytest.raises(ValueError, match="replica_num_gpus"):
        ServeConfig(engine={"backend": "trtllm"})
