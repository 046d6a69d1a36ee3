"""Tensor parallelism in the engine, the nano-vllm way.

Rank 0 is the engine process: its EngineCore keeps the one scheduler, page manager and sampler, and
drives its ModelRunner through a `TensorParallelRunner`. Ranks 1..N-1 are worker processes (spawned,
daemonic), each with a ModelRunner over its shard of the model and of the KV cache (KV heads split,
the same page count on every rank, so one page table serves all). Before rank 0 runs a runner call it
sends the call (the method's name and small arguments: token ids, page tables, block lengths; never
tensors) to every worker, so all ranks run the same passes and their collectives (gloo on CPU, NCCL on
CUDA) pair up. The LM head all-gathers the vocabulary, so every rank has the full logits; rank 0's
are the ones used. A worker exits on `close()`, or when its pipe to rank 0 closes (rank 0 exited).
"""

import logging
import os
import socket
import weakref
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orthrus_engines.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)
_owner: "weakref.ref[TensorParallelRunner] | None" = None  # the runner holding this process's group (weak:
# an engine nobody references is collected, and its __del__ stops its workers)
JOIN_SECONDS = 30.0  # how long close() waits for a worker before terminating it


def tensor_parallel_active() -> bool:
    """Whether a tensor-parallel engine in this process holds the default process group."""
    return _owner is not None and _owner() is not None


def _seq_view(seq) -> tuple[int, list[int], list[int], int]:
    """What a runner reads of a sequence, cheap to send: num_cached, the ids not cached yet (the
    ones a pass may read), the page table, the length."""
    return seq.num_cached, seq.token_ids[seq.num_cached :], list(seq.page_table), len(seq.token_ids)


def _rebuild(view: tuple[int, list[int], list[int], int]) -> SimpleNamespace:
    num_cached, tail, page_table, length = view
    assert num_cached + len(tail) == length
    return SimpleNamespace(num_cached=num_cached, token_ids=[0] * num_cached + tail, page_table=page_table,
                           forward_passes=0)


class TensorParallelRunner:
    """Rank 0's ModelRunner, and the workers that follow it. Attributes read through to rank 0's runner."""

    def __init__(self, runner_kwargs: dict, world: int):
        global _owner
        if dist.is_initialized():
            raise RuntimeError("tensor parallelism needs a process without a torch.distributed group "
                               "(one tensor-parallel engine per process)")
        device = runner_kwargs["device"]
        backend = "nccl" if device.type == "cuda" else "gloo"
        init = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(1, world):
            parent, child = ctx.Pipe()
            kwargs = dict(runner_kwargs, device=_rank_device(device, rank))
            proc = ctx.Process(target=_worker_main, args=(rank, world, backend, init, kwargs, child,
                                                          torch.get_num_threads()), daemon=True,
                               name=f"orthrus-tp{rank}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.closed = False
        try:
            if device.type == "cuda":
                torch.cuda.set_device(_rank_device(device, 0))
            dist.init_process_group(backend, init_method=init, rank=0, world_size=world,
                                    timeout=timedelta(minutes=10))
            _owner, self.owns_group = weakref.ref(self), True
            self.runner = ModelRunner(**dict(runner_kwargs, device=_rank_device(device, 0)))
            for rank, conn in enumerate(self.conns, 1):
                try:
                    status = conn.recv()
                except EOFError:  # it died before it could say why (its stderr may)
                    self.procs[rank - 1].join(JOIN_SECONDS)
                    status = f"exited with code {self.procs[rank - 1].exitcode}"
                if status != "ready":
                    raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {status}")
        except BaseException:
            self.close()
            raise
        self._mask_hidden: torch.Tensor | None = None  # the last verify_and_draft's; workers keep theirs

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __getattr__(self, name: str):
        if name in ("runner", "conns", "procs", "closed"):  # not set yet: a failed __init__
            raise AttributeError(name)
        return getattr(self.runner, name)

    def _send(self, name: str, *args) -> None:
        if self.closed:
            raise RuntimeError("the engine is closed")
        for conn in self.conns:
            conn.send((name, args))

    # -- the runner's calls: sent to the workers, then run here ----------------------------------
    def prefill(self, seqs, ends: list[int]):
        self._send("prefill", [_seq_view(s) for s in seqs], ends)
        return self.runner.prefill(seqs, ends)

    def draft(self, seqs, ks: list[int], write_tail: bool = False):
        self._send("draft", [_seq_view(s) for s in seqs], ks, write_tail)
        return self.runner.draft(seqs, ks, write_tail)

    def verify(self, seqs, blocks: list[list[int]]):
        self._send("verify", [_seq_view(s) for s in seqs], blocks)
        return self.runner.verify(seqs, blocks)

    def verify_and_draft(self, seqs, blocks: list[list[int]], ms: list[int]):
        self._send("verify_and_draft", [_seq_view(s) for s in seqs], blocks, ms)
        self._mask_hidden = None
        ar_logits, self._mask_hidden = self.runner.verify_and_draft(seqs, blocks, ms)
        return ar_logits, self._mask_hidden

    def logits(self, hidden: torch.Tensor, rows: list[int]):
        """Logits of rows of the last verify_and_draft's MASK hidden states (the only hidden states
        the engine keeps between calls; each worker has its own copy)."""
        if hidden is not self._mask_hidden:
            raise ValueError("under tensor parallelism, logits() takes the last verify_and_draft's hidden states")
        self._send("logits", rows)
        return self.runner.logits(hidden, rows)

    def time_forward(self, n: int, repeats: int = 1) -> float:
        self._send("time_forward", n, repeats)
        return self.runner.time_forward(n, repeats)

    def time_verify_and_draft(self, k: int, batch: int, repeats: int = 1) -> float:
        self._send("time_verify_and_draft", k, batch, repeats)
        return self.runner.time_verify_and_draft(k, batch, repeats)

    # -- shutdown ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers and leave the process group; idempotent."""
        global _owner
        if getattr(self, "closed", True):
            return
        self.closed = True
        for conn in self.conns:
            try:
                conn.send(("exit", ()))
            except OSError:
                pass  # that worker is gone already
        for proc in self.procs:
            proc.join(JOIN_SECONDS)
            if proc.is_alive():
                log.warning("tensor-parallel worker %s did not exit; terminating it", proc.pid)
                proc.terminate()
                proc.join(JOIN_SECONDS)
        for conn in self.conns:
            conn.close()
        if getattr(self, "owns_group", False):
            dist.destroy_process_group()
            _owner, self.owns_group = None, False

    def __del__(self):
        self.close()


def _rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world: int, backend: str, init: str, runner_kwargs: dict, conn, threads: int) -> None:
    """Ranks 1..N-1: build this rank's runner, then run each call rank 0 sends until told to exit."""
    torch.set_num_threads(threads)
    device = runner_kwargs["device"]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=10))
    try:
        runner = ModelRunner(**runner_kwargs)
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send("ready")
    mask_hidden = None
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):  # rank 0 is gone
            break
        if name == "exit":
            break
        try:
            if name == "logits":
                runner.logits(mask_hidden, *args)
            elif name == "verify_and_draft":
                seqs, blocks, ms = args
                mask_hidden = None
                _, mask_hidden = runner.verify_and_draft([_rebuild(v) for v in seqs], blocks, ms)
            elif name in ("prefill", "draft", "verify"):
                seqs, *rest = args
                getattr(runner, name)([_rebuild(v) for v in seqs], *rest)
            else:  # the start-up timings
                getattr(runner, name)(*args)
        except Exception as e:  # rank 0 ran the same call and reports the same fault
            log.debug("rank %d (pid %d): %s failed: %s", rank, os.getpid(), name, e)
    conn.close()
    dist.destroy_process_group()
