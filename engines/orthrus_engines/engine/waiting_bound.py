"""The bound on an engine's waiting queue (EngineArgs.max_waiting_requests), shared by every backend: a request
that would wait past it is refused with EngineOverloaded (a server's 429 / RESOURCE_EXHAUSTED) before it is
queued. Each backend counts its own waiting requests: the torch engine its scheduler's queue exactly, the trtllm
engine the requests it has in flight past the batch TensorRT-LLM runs (`waiting_past_batch`)."""

from orthrus_engines.errors import EngineOverloaded


def check_room(num_waiting: int, max_waiting_requests: int | None) -> None:
    """Raise EngineOverloaded if `num_waiting` requests already wait and that fills the bound (None: no bound)."""
    if max_waiting_requests is not None and num_waiting >= max_waiting_requests:
        raise EngineOverloaded(f"the engine's waiting queue is full ({max_waiting_requests} requests)")


def waiting_past_batch(in_flight: int, max_num_seqs: int) -> int:
    """Requests that wait for a batch slot when `in_flight` are submitted and at most `max_num_seqs` run at once.
    A lower bound where the KV cache, not the batch size, holds requests back (TensorRT-LLM's own count of them
    arrives with its iteration stats, too late to refuse the next request on)."""
    return max(0, in_flight - max_num_seqs)
