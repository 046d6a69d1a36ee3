"""Dense (unpaged) forward passes for training, built from the model's own modules.

- `teacher_forward`: the frozen AR view over whole windows [B, L], causal; returns the final hidden
  states and every layer's rotated K/V, which the diffusion view reads as its prefix.
- `student_forward`: the diffusion view over A blocks per window, each `[anchor, MASK x (K-1)]` at
  positions p..p+K-1. A block query sees the AR keys before its anchor and all keys of its own block,
  exactly what it sees at inference (docs/ARCHITECTURE.md §1). With `anchor_view` "ar", the anchor rows use
  the AR projections and only the MASK rows the twins. With "causal", an anchor row is exactly the
  teacher's row at p, so the block is only its K-1 MASK rows at p+1..p+K-1, reading the AR keys
  through p.
"""

import torch
import torch.nn.functional as F

from orthrus_engines.models.layers import apply_rotary
from orthrus_engines.models.orthrus import AttentionView, DualViewAttention, OrthrusModel


def _project(attn: DualViewAttention, view: AttentionView, x: torch.Tensor, cos, sin):
    B, T, _ = x.shape
    q_size, kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    q, k, v = view.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(B, T, attn.num_heads, attn.head_dim)
    k = k.view(B, T, attn.num_kv_heads, attn.head_dim)
    v = v.view(B, T, attn.num_kv_heads, attn.head_dim)
    if view.q_norm is not None:
        q, k = view.q_norm(q), view.k_norm(k)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def _attend(attn: DualViewAttention, q, k, v, mask=None, causal=False):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> [B, Tq, H*D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=causal, scale=attn.scale, enable_gqa=True)
    return out.transpose(1, 2).flatten(2)


def _rope(model: OrthrusModel, positions: torch.Tensor, dtype):
    """cos/signed sin (see apply_rotary) for positions [..., T], shaped [..., T, 1, D] to broadcast over heads."""
    cos, signed_sin = model.rotary.cos[positions], model.rotary.signed_sin[positions]
    return cos.unsqueeze(-2).to(dtype), signed_sin.unsqueeze(-2).to(dtype)


@torch.no_grad()
def teacher_forward(model: OrthrusModel, ids: torch.Tensor):
    """ids [B, L] -> (normed hidden [B, L, H], [(k, v)] per layer, each [B, L, Hkv, D])."""
    x = model.embed_tokens(ids)
    cos, sin = _rope(model, torch.arange(ids.shape[1], device=ids.device), x.dtype)
    kvs = []
    for layer in model.layers:
        attn = layer.self_attn
        q, k, v = _project(attn, attn.ar, layer.input_layernorm(x), cos, sin)
        kvs.append((k, v))
        x = x + attn.ar.o(_attend(attn, q, k, v, causal=True))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.norm(x), kvs


def block_inputs(ids: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int,
                 with_anchor: bool = True):
    """Block token ids and positions [B, A*K] for anchors [B, A]: `[t_p, MASK x (K-1)]` at p..p+K-1
    (`with_anchor=False`: `MASK x K` at p..p+K-1)."""
    B, A = anchors.shape
    offsets = torch.arange(block_size, device=ids.device)
    positions = (anchors.unsqueeze(-1) + offsets).reshape(B, A * block_size)
    tokens = torch.full((B, A, block_size), mask_token_id, dtype=ids.dtype, device=ids.device)
    if with_anchor:
        tokens[:, :, 0] = ids.gather(1, anchors)
    return tokens.reshape(B, A * block_size), positions


def block_attention_mask(anchors: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """[B, 1, A*K, L + A*K] bool: AR keys before the query's anchor, and the query's own block."""
    B, A = anchors.shape
    anchor_of_query = anchors.repeat_interleave(block_size, dim=1)  # [B, Q]
    prefix = torch.arange(seq_len, device=anchors.device) < anchor_of_query.unsqueeze(-1)  # [B, Q, L]
    block_id = torch.arange(A, device=anchors.device).repeat_interleave(block_size)
    own = (block_id.unsqueeze(1) == block_id.unsqueeze(0)).expand(B, -1, -1)  # [B, Q, Q]
    return torch.cat([prefix, own], dim=-1).unsqueeze(1)


def _with_anchor_rows(block_rows: torch.Tensor, anchor_rows: torch.Tensor, K: int) -> torch.Tensor:
    """[B, A*K, ...] rows with each block's slot 0 replaced by `anchor_rows` [B, A, ...]."""
    B, A = anchor_rows.shape[:2]
    rest = block_rows.view(B, A, K, *block_rows.shape[2:])[:, :, 1:]
    return torch.cat([anchor_rows.unsqueeze(2), rest], dim=2).flatten(1, 2)


def student_forward(model: OrthrusModel, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                    teacher_kv: list[tuple[torch.Tensor, torch.Tensor]], ar_anchors_every: int | None = None
                    ) -> torch.Tensor:
    """The diffusion view over the blocks; returns normed hidden states [B, A*K, H].
    `ar_anchors_every` = K: each block's anchor row (every K-th) uses the AR projections."""
    x = model.embed_tokens(tokens)
    cos, sin = _rope(model, positions, x.dtype)
    every = ar_anchors_every
    for layer, (pk, pv) in zip(model.layers, teacher_kv):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = _project(attn, attn.diff, h, cos, sin)
        if every:
            aq, ak, av = _project(attn, attn.ar, h[:, ::every], cos[:, ::every], sin[:, ::every])
            q, k, v = (_with_anchor_rows(t, a, every) for t, a in ((q, aq), (k, ak), (v, av)))
        out = _attend(attn, q, torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1), mask=mask)
        y = attn.diff.o(out)
        x = x + (_with_anchor_rows(y, attn.ar.o(out[:, ::every]), every) if every else y)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.norm(x)


def student_blocks(model: OrthrusModel, ids: torch.Tensor, anchors: torch.Tensor, block_size: int,
                   mask_token_id: int, hidden_t: torch.Tensor, kvs: list[tuple[torch.Tensor, torch.Tensor]],
                   anchor_view: str = "diffusion") -> torch.Tensor:
    """Normed hidden states [B, A, K, H] of each anchor's block `[t_p, MASK x (K-1)]`, given the
    teacher's pass over `ids` (hidden_t, kvs); slot j predicts token p+j+1."""
    B, L = ids.shape
    A, K = anchors.shape[1], block_size
    if anchor_view == "causal":  # the anchor row is the teacher's own; the MASK rows read the AR keys through p
        tokens, positions = block_inputs(ids, anchors + 1, K - 1, mask_token_id, with_anchor=False)
        masks = student_forward(model, tokens, positions, block_attention_mask(anchors + 1, L, K - 1), kvs)
        anchor_rows = hidden_t.gather(1, anchors.unsqueeze(-1).expand(-1, -1, hidden_t.shape[-1]))
        return torch.cat([anchor_rows.unsqueeze(2), masks.view(B, A, K - 1, -1)], dim=2)
    tokens, positions = block_inputs(ids, anchors, K, mask_token_id)
    hidden = student_forward(model, tokens, positions, block_attention_mask(anchors, L, K), kvs,
                             K if anchor_view == "ar" else None)
    return hidden.view(B, A, K, -1)


def distillation_loss(model: OrthrusModel, ids: torch.Tensor, anchors: torch.Tensor, block_size: int,
                      mask_token_id: int, trainable: torch.Tensor | None = None,
                      slot_decay: float = 1.0, anchor_view: str = "diffusion") -> tuple[torch.Tensor, dict]:
    """Forward KL(AR || diffusion) at every draft slot: slot j of the block at anchor p predicts token
    p+j+1, and the teacher is the frozen AR distribution at position p+j (teacher forcing).

    `trainable` [B, L] (optional) drops slots whose target token is not a training target.
    `slot_decay` < 1 weights slot j by slot_decay**j: a draft counts only if all before it are
    accepted, so early slots matter most (1 = uniform, the paper's recipe). `anchor_view`: the head
    option (see the module docstring); with "causal", slot 0 is the teacher's own row (KL 0).
    Returns the weighted mean KL per slot and stats (slots, greedy agreement by slot).
    """
    B, A, K = ids.shape[0], anchors.shape[1], block_size
    hidden_t, kvs = teacher_forward(model, ids)
    slot_pos = anchors.unsqueeze(-1) + torch.arange(K - 1, device=ids.device)  # draft slots 0..K-2
    hidden_s = student_blocks(model, ids, anchors, K, mask_token_id, hidden_t, kvs, anchor_view)
    valid = torch.ones_like(slot_pos, dtype=torch.bool)
    if trainable is not None:
        valid = trainable.gather(1, (slot_pos + 1).flatten(1)).view_as(slot_pos)
    t_rows = hidden_t.gather(1, slot_pos.flatten(1).unsqueeze(-1).expand(-1, -1, hidden_t.shape[-1]))
    s_rows = hidden_s[:, :, : K - 1].flatten(1, 2)
    keep = valid.flatten(1)
    with torch.no_grad():
        t_logp = F.log_softmax(model.logits(t_rows[keep]), dim=-1)
    s_logp = F.log_softmax(model.logits(s_rows[keep]), dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)
    slot = torch.arange(K - 1, device=ids.device).expand(B, A, -1).flatten(1)[keep]
    weight = slot_decay ** slot.float()
    with torch.no_grad():
        agree = (s_logp.argmax(-1) == t_logp.argmax(-1)).float()
        by_slot = torch.zeros(K - 1, device=ids.device).index_add_(0, slot, agree)
        count = torch.zeros(K - 1, device=ids.device).index_add_(0, slot, torch.ones_like(agree))
    loss = (kl * weight).sum() / weight.sum()
    return loss, {"slots": int(keep.sum()), "agree_by_slot": (by_slot / count.clamp(min=1)).tolist()}
