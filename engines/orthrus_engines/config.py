import importlib.util
from dataclasses import dataclass, fields

import torch

from orthrus_engines.errors import OrthrusInputError

ATTENTION_BACKENDS = ("torch", "triton")
DRAFT_KV_MODES = ("transient", "tail")


@dataclass
class EngineArgs:
    """Engine settings. Everything has a default that runs on the machine at hand."""

    model: str | None = None  # local directory; None = the built-in default
    head: str | None = None  # an Orthrus head applied to `model`; the built-in model's shipped one by default; "none"
    tokenizer: str | None = None  # defaults to the model directory
    block_size: int | str | None = None  # "auto"/None: the auto policy up to the model's K; an int: fixed K; 1: AR
    page_size: int = 16
    num_pages: int | None = None  # KV cache pages; None = from kv_cache_gb
    kv_cache_gb: float | None = None  # None: 1 GiB on CPU, 40% of free memory on CUDA
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # requests waiting for a batch slot; past it add_request raises EngineOverloaded (None: no bound;
    # the offline LLM queues a whole batch, a server sets one)
    max_waiting_requests: int | None = None
    max_model_len: int | None = None  # None = the model's window
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    device: str | None = None  # None: cuda if available, else cpu
    enable_prefix_cache: bool = True
    cpu_packed_weights: bool = True  # CPU fp32: oneDNN-packed copies of the linear weights (faster, 2x weight memory)
    # `anchor_view: "causal"` heads: verify a block and draft the next in one pass (one pass per cycle
    # instead of two; K x K rows per sequence instead of 2 x K, K capped so that the K x (K - 1)
    # transient rows fit in one block of the model's K: 3 for K = 8). False: docs/ARCHITECTURE.md §1's two passes.
    fused_cycle: bool = True
    compile: bool = False  # torch.compile the model (inductor): less per-op overhead; each new pass shape compiles first
    # paged attention: "torch" (gather + SDPA) or "triton" (orthrus_kernels' kernels; on CPU under Triton's
    # interpreter, slow: for tests); None: triton on CUDA when Triton is installed, torch otherwise
    attention_backend: str | None = None
    # the two-pass cycle's draft block: "transient" K/V, or "tail": written into the uncommitted tail slots
    # (num_cached .. num_cached + K - 1), read back from the cache and overwritten by the verify pass, as
    # TensorRT-LLM's one-model draft pass does. The fused cycle's blocks stay transient either way.
    draft_kv: str = "transient"
    # ranks the model is split over (heads, KV heads, MLP and vocabulary): rank 0 is the engine process,
    # ranks 1..N-1 worker processes (gloo on CPU; NCCL on CUDA, rank r on cuda:r)
    tensor_parallel_size: int = 1
    # "torch": this engine; "trtllm": Orthrus in TensorRT-LLM (orthrus_engines.trtllm), refused naming
    # tensorrt_llm where it is not installed
    backend: str = "torch"
    # True: every pass runs eagerly. False (default): on CUDA with the Triton backend, one rank and no
    # `compile`, the decode, verify, draft and fused passes are captured as CUDA graphs per batch-size bucket
    # and replayed (passes above the largest bucket, and prefill, stay eager); on CPU passes are always eager
    enforce_eager: bool = False

    def check_backend(self) -> None:
        """The torch engine serves backend "torch"; "trtllm" runs in TensorRT-LLM's executor."""
        from orthrus_engines.trtllm import validate_backend

        if validate_backend(self.backend) == "trtllm":
            raise OrthrusInputError("backend", "'trtllm' runs in TensorRT-LLM's own LLM, not this engine: call "
                                    "orthrus_engines.trtllm.register() and give tensorrt_llm.LLM an OrthrusDecodingConfig")

    def resolve_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is not None:
            return getattr(torch, self.dtype)
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def resolve_attention_backend(self, device: torch.device) -> str:
        backend = self.attention_backend
        if backend is None:
            return "triton" if device.type == "cuda" and importlib.util.find_spec("triton") else "torch"
        if backend not in ATTENTION_BACKENDS:
            raise OrthrusInputError("attention_backend", f"must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        if backend == "triton" and importlib.util.find_spec("triton") is None:
            raise OrthrusInputError("attention_backend", "'triton' needs the triton package (Linux x86_64)")
        return backend

    def resolve_cuda_graphs(self, device: torch.device, attention_backend: str, tp: int) -> bool:
        """Whether the decode-time passes replay CUDA graphs (see `enforce_eager`)."""
        return (not self.enforce_eager and device.type == "cuda" and attention_backend == "triton" and tp == 1
                and not self.compile)

    def resolve_draft_kv(self) -> str:
        if self.draft_kv not in DRAFT_KV_MODES:
            raise OrthrusInputError("draft_kv", f"must be one of {DRAFT_KV_MODES}, got {self.draft_kv!r}")
        return self.draft_kv

    def resolve_tensor_parallel_size(self, shape, device: torch.device) -> int:
        """The TP size, checked against the model's `shape` (a ModelShape) and the devices at hand."""
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise OrthrusInputError("tensor_parallel_size", f"must be an integer >= 1, got {tp!r}")
        for name, n in (("attention heads", shape.num_heads), ("KV heads", shape.num_kv_heads),
                        ("MLP intermediate size", shape.intermediate_size)):
            if n % tp:
                raise OrthrusInputError("tensor_parallel_size", f"must divide the model's {name} ({n}), got {tp}")
        if device.type == "cuda" and tp > torch.cuda.device_count():
            raise OrthrusInputError("tensor_parallel_size", f"{tp} ranks need {tp} GPUs, "
                                                            f"{torch.cuda.device_count()} visible")
        return tp

    def resolve_max_waiting_requests(self) -> int | None:
        bound = self.max_waiting_requests
        if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool) or bound < 1):
            raise OrthrusInputError("max_waiting_requests", f"must be None or an integer >= 1, got {bound!r}")
        return bound

    def kv_cache_bytes(self, device: torch.device) -> int:
        if self.kv_cache_gb is not None:
            return int(self.kv_cache_gb * 2**30)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * 0.4)
        return 2**30


def engine_args_from(model: str | None, block_size: int | None, kwargs: dict) -> EngineArgs:
    names = {f.name for f in fields(EngineArgs)}
    unknown = set(kwargs) - names
    if unknown:
        raise OrthrusInputError(sorted(unknown)[0], f"unknown engine argument; known: {sorted(names)}")
    return EngineArgs(model=model, block_size=block_size, **kwargs)

