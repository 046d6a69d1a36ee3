"""The dual-view Orthrus model for the Llama and Qwen3 families.

Every attention layer has two sets of projections: the frozen AR view (`qkv_proj`, `o_proj`,
`q_norm`, `k_norm`) and its trainable twin, the diffusion view (`qkv_proj_diff`, `o_proj_diff`,
`q_norm_diff`, `k_norm_diff`). Embeddings, layer norms, MLPs, final norm and LM head are shared.
Both views read one paged KV cache; only the AR view writes it.

Inputs are flat: `ids [T]`, `positions [T]` for all tokens of all sequences in the pass; the
attention metadata says which tokens belong to which sequence.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from orthrus_kernels import AttentionMetadata, paged_attention
from torch import nn

from orthrus_engines.models.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_rotary,
    tp_rank_size,
)


@dataclass
class ModelShape:
    """What the model code needs from an HF config (Llama or Qwen3)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qk_norm: bool  # Qwen3 family
    attention_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg, qk_norm: bool) -> "ModelShape":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            qk_norm=qk_norm,
            attention_bias=bool(getattr(cfg, "attention_bias", False)),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )


class AttentionView(nn.Module):
    """One view's projections: fused QKV, output, and (Qwen3) per-head q/k norms."""

    def __init__(self, s: ModelShape):
        super().__init__()
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.qkv = ColumnParallelLinear(s.hidden_size, [q, kv, kv], bias=s.attention_bias)
        self.o = RowParallelLinear(q, s.hidden_size, bias=False)
        self.q_norm = RMSNorm(s.head_dim, s.rms_norm_eps) if s.qk_norm else None
        self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps) if s.qk_norm else None


class DualViewAttention(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        _, world = tp_rank_size()
        self.num_heads, self.num_kv_heads = s.num_heads // world, s.num_kv_heads // world
        self.head_dim = s.head_dim
        self.scale = s.head_dim**-0.5
        self.ar = AttentionView(s)
        self.diff = AttentionView(s)

    def _project(self, view: AttentionView, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(qk [T, H + Hkv, D] normed, not rotated; v [T, Hkv, D])."""
        T = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qk, v = view.qkv(x).split([q_size + kv_size, kv_size], dim=-1)
        qk = qk.view(T, self.num_heads + self.num_kv_heads, self.head_dim)
        if view.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([view.q_norm(q), view.k_norm(k)], dim=1)
        return qk, v.view(T, self.num_kv_heads, self.head_dim)

    def forward(self, x, rope, meta: AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor], diffusion: bool,
                ar_rows: torch.Tensor | None = None):
        """`ar_rows` (diffusion only): rows that use the AR projections, the anchors of an
        `anchor_view: "ar"` head."""
        view = self.diff if diffusion else self.ar
        qk, v = self._project(view, x)
        if ar_rows is not None:
            ar_qk, ar_v = self._project(self.ar, x[ar_rows])
            qk, v = qk.index_copy(0, ar_rows, ar_qk), v.index_copy(0, ar_rows, ar_v)
        q, k = apply_rotary(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)  # q and k in one go
        out = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale).flatten(1)
        if ar_rows is None:
            return view.o(out)
        # both views' output projections on their rows, then one all-reduce (the o layers have no bias)
        return view.o.reduce(view.o.partial(out).index_copy(0, ar_rows, self.ar.o.partial(out[ar_rows])))


class MLP(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.gate_up = ColumnParallelLinear(s.hidden_size, [s.intermediate_size, s.intermediate_size])
        self.down = RowParallelLinear(s.intermediate_size, s.hidden_size)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = DualViewAttention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s)

    def forward(self, x, rope, meta, kv, diffusion: bool, ar_rows: torch.Tensor | None = None):
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, kv, diffusion, ar_rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class OrthrusModel(nn.Module):
    def __init__(self, s: ModelShape, hf_config, max_positions: int):
        super().__init__()
        self.shape = s
        self.rotary = RotaryEmbedding(hf_config, max_positions)
        self.embed_tokens = VocabParallelEmbedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.lm_head = ParallelLMHead(s.vocab_size, s.hidden_size)
        if s.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        diffusion: bool = False,
        ar_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns final hidden states [T, hidden] (normed); `logits()` maps chosen rows to vocab.
        `ar_rows`: rows of a diffusion pass that use the AR projections (see DualViewAttention)."""
        x = self.embed_tokens(ids)
        rope = self.rotary(positions, x.dtype)
        for layer, kv in zip(self.layers, kv_cache):
            x = layer(x, rope, meta, kv, diffusion, ar_rows)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def twin_parameters(self) -> dict[str, nn.Parameter]:
        """The diffusion view's parameters (the only ones training touches)."""
        return {n: p for n, p in self.named_parameters() if ".diff." in n}

    @torch.no_grad()
    def copy_ar_to_twins(self) -> None:
        """Initialise the diffusion view as a copy of the AR view (a base checkpoint without twins)."""
        for layer in self.layers:
            layer.self_attn.diff.load_state_dict(layer.self_attn.ar.state_dict())
