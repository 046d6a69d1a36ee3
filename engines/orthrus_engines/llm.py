"""Offline batch inference in the shape users know from vLLM."""

import itertools

from orthrus_engines.config import engine_args_from
from orthrus_engines.engine.engine_core import EngineCore
from orthrus_engines.inputs import Prompt
from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.outputs import RequestAccumulator, RequestOutput
from orthrus_engines.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, block_size: int | None = None, **engine_args):
        self.core = EngineCore(engine_args_from(model, block_size, engine_args))
        self.tokenizer = self.core.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; with n > 1 its `outputs` holds every sample's."""
        if not isinstance(prompts, list) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt; tokenize() names what is wrong with a bad one
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise OrthrusInputError("sampling_params", f"{len(sampling_params)} params for {len(prompts)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        ids = [self.core.tokenize(p) for p in prompts]  # validate every prompt before running any
        rids: list[str] = []
        try:
            for p_ids, sp in zip(ids, params):
                rids.append(f"offline-{next(self._ids)}")
                self.core.add_request(rids[-1], p_ids, sp)
        except Exception:
            for rid in rids:  # all or nothing: a bad request leaves no half-added batch behind
                self.core.abort(rid)
            raise
        results = {rid: RequestAccumulator() for rid in rids}
        while self.core.has_unfinished():
            for delta in self.core.step():
                results[delta.request_id].add(delta)
        return [results[r].result() for r in rids]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix: later requests prefill from scratch."""
        self.core.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine's tensor-parallel workers (also done when the engine is garbage-collected)."""
        self.core.close()

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None):
        """One conversation ([{role, content}, ...]) or a list of them, through the chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.core.inputs.chat_ids(c) for c in convs], sampling_params)
