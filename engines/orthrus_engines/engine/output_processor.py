"""Output processing: a step's tokens committed to a sequence one by one (stop strings, EOS, stop
token ids, the token budget, the window; incremental detokenization), and the delta a caller gets."""

from orthrus_engines.engine.sequence import Sequence, Status
from orthrus_engines.outputs import COUNTERS, RequestOutput


class OutputProcessor:
    def __init__(self, eos_ids: set[int], max_model_len: int):
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len

    def commit(self, seq: Sequence, tokens: list[int]) -> int:
        """Append tokens until the first stop condition; the number appended. A stop string ends the
        text where it starts and the tokens with the one that completed it."""
        p = seq.params
        max_stop = max((len(s) for s in p.stop), default=0)
        stopped_by_string, appended = False, 0
        step_logprobs, seq.step_logprobs = seq.step_logprobs, None
        for t in tokens:
            seq.token_ids.append(t)
            if step_logprobs is not None:
                seq.logprobs.append(step_logprobs[appended])
            appended += 1
            if seq.detok is not None:
                before = len(seq.text)
                seq.text += seq.detok.add(t)
                # as vLLM: no stop string ends within the first min_tokens tokens
                checks = p.stop and seq.completion_tokens > p.min_tokens
                hit = find_stop(seq.text, p.stop, max(0, before - max_stop + 1)) if checks else None
                if hit is not None:
                    seq.text = seq.text[:hit]
                    seq.finish_reason, stopped_by_string = "stop", True
                    break
            # with a grammar, EOS comes only where the grammar ends: it ends the request even with ignore_eos
            if (t in self.eos_ids and (not p.ignore_eos or p.structured is not None)) or t in p.stop_token_ids:
                seq.finish_reason = "stop"
                break
            if seq.completion_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
                seq.finish_reason = "length"
                break
        if seq.finish_reason is not None:
            seq.status = Status.FINISHED
            if seq.detok is not None and not stopped_by_string:
                seq.text += seq.detok.flush()
        return appended

    @staticmethod
    def delta(seq: Sequence) -> RequestOutput:
        """New tokens and text since the last delta; text that may still turn out to be the start
        of a stop string is held back until it cannot."""
        finished = seq.finish_reason is not None
        visible = len(seq.text)
        if not finished and seq.params.stop:
            visible -= max(len(s) for s in seq.params.stop) - 1
        visible = max(visible, seq.emitted_text)
        out = RequestOutput(
            request_id=seq.request_id,
            token_ids=seq.output_ids[seq.emitted_tokens :],
            text=seq.text[seq.emitted_text : visible],
            finished=finished,
            finish_reason=seq.finish_reason,
            error=seq.error,
            logprobs=seq.logprobs[seq.emitted_tokens :] if seq.params.logprobs is not None else None,
            index=seq.index,
            **{name: getattr(seq, name) for name in COUNTERS},  # a sequence's counters go by the same names
        )
        seq.emitted_tokens, seq.emitted_text = seq.completion_tokens, visible
        return out


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
