"""Building blocks of the dual-view model, written tensor-parallel ready.

Column-parallel linears split their output features across ranks, row-parallel linears split
their input features and all-reduce the result; with world size 1 (the default) they are plain
linears. Every parameter carries a `weight_loader(param, full_tensor, shard)` that copies its rank's
slice out of a full checkpoint tensor.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None):
    """y = x W^T + b, through oneDNN's pre-packed weight when there is one (see `pack_weights_for_cpu`)."""
    if packed is None:
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():  # torch.compile cannot trace the oneDNN op itself; it sees an opaque one
        return packed_linear(x, weight, packed, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@torch.library.custom_op("orthrus::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The oneDNN packed linear as an op torch.compile treats as a black box (`weight` gives the shape).
    Eager code calls oneDNN directly: going through this op costs about 16 us more per call."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x, weight, packed, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def pack_weights_for_cpu(model: nn.Module) -> None:
    """Give every linear (LM head included) a copy of its weight in oneDNN's blocked layout, for inference.

    On CPU, MKL's row-major GEMV/GEMM reaches about half the memory bandwidth at 1-16 rows; the
    packed layout is 1.7-2.2x faster there (docs/BENCHMARKS.md). The plain weights stay, so the
    model can still be read, saved and trained; the price is twice the weight memory.
    """
    for m in model.modules():
        if isinstance(m, PACKABLE):
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().contiguous(), None)


def cpu_packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def tp_rank_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's rows (output features) split across ranks. Fused layers list their parts'
    full output sizes in `part_sizes`; each part is split separately, so shard `i` of a checkpoint
    lands in part `i` of every rank."""

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool = False):
        super().__init__()
        self.rank, self.world = tp_rank_size()
        assert all(p % self.world == 0 for p in part_sizes), "output features must divide by TP size"
        self.local_parts = [p // self.world for p in part_sizes]
        self.weight = nn.Parameter(torch.empty(sum(self.local_parts), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.local_parts)), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None
        for p in self.parameters():
            p.weight_loader = self.load_shard

    def load_shard(self, param: nn.Parameter, full: torch.Tensor, shard: int = 0) -> None:
        size = self.local_parts[shard]
        start = sum(self.local_parts[:shard])
        param.data[start : start + size].copy_(full.narrow(0, self.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's columns (input features) split across ranks; partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.rank, self.world = tp_rank_size()
        self.local_in = in_features // self.world
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None
        self.weight.weight_loader = self.load_shard
        if self.bias is not None:
            self.bias.weight_loader = lambda p, full, shard=0: p.data.copy_(full)

    def load_shard(self, param: nn.Parameter, full: torch.Tensor, shard: int = 0) -> None:
        param.data.copy_(full.narrow(1, self.rank * self.local_in, self.local_in))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum, not yet reduced (rows from several such layers can share one `reduce`)."""
        return linear(x, self.weight, None, self.packed)

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.partial(x))


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary range across ranks; the LM head reuses the same split."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.rank, self.world = tp_rank_size()
        self.local_vocab = -(-vocab_size // self.world)
        self.start = self.rank * self.local_vocab
        self.weight = nn.Parameter(torch.zeros(self.local_vocab, dim), requires_grad=False)
        self.weight.weight_loader = self.load_shard

    def load_shard(self, param: nn.Parameter, full: torch.Tensor, shard: int = 0) -> None:
        part = full[self.start : self.start + self.local_vocab]
        param.data[: part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.local_vocab)
        y = F.embedding(local.clamp(0, self.local_vocab - 1), self.weight) * inside.unsqueeze(-1)
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__(vocab_size, dim)
        self.vocab_size = vocab_size
        self.packed: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = linear(h, self.weight, None, self.packed)
        if self.world > 1:
            parts = [torch.empty_like(logits) for _ in range(self.world)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.vocab_size]


PACKABLE = (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)  # the layers `pack_weights_for_cpu` packs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """HF's `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`, computed in fp32 (few ops: this runs
        twice per layer and is overhead-bound at decode sizes; torch's fused rms_norm is slower on CPU)."""
        h = x.float()
        h = h * torch.rsqrt(torch.mean(h * h, -1, keepdim=True).add_(self.eps))
        return (h if x.dtype == torch.float32 else h.to(x.dtype)) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed as HF does (inv_freq from the config's rope type)."""

    def __init__(self, hf_config, max_positions: int):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        hf_rope = LlamaRotaryEmbedding(hf_config)  # resolves rope_type / scaling exactly like HF
        inv_freq, scaling = hf_rope.inv_freq.float(), hf_rope.attention_scaling
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
        self.register_buffer("cos", torch.cat([cos, cos], dim=-1), persistent=False)
        # rotate_half's sign folded into the table: [-sin | sin] (see apply_rotary)
        self.register_buffer("signed_sin", torch.cat([-sin, sin], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for these positions, shaped [T, 1, head_dim] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.signed_sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's `x * cos + rotate_half(x) * sin`, bit for bit: rotate_half(x) * sin = roll(x) * [-sin | sin]."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
