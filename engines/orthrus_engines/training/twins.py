"""Which parameters training touches, and how: the twins in full rank, or a low-rank delta on top
of the AR view (`W_twin = W_ar + B @ A`), so a head stays small enough to ship."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from orthrus_engines.models.checkpoint import load_tensors
from orthrus_engines.models.heads import lowrank_key, twin_state_dict
from orthrus_engines.models.orthrus import OrthrusModel


class LowRankDelta(nn.Module):
    """Parametrisation W -> W + B @ A; B starts at zero so training starts from the twin as it is."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype)


def _twin_linears(model: OrthrusModel):
    for i, layer in enumerate(model.layers):
        yield i, "qkv", layer.self_attn.diff.qkv
        yield i, "o", layer.self_attn.diff.o


def make_trainable(model: OrthrusModel, rank: int, seed: int = 0) -> list[nn.Parameter]:
    """Freeze everything, then open the twins: full rank (`rank` 0) or low-rank deltas on the twin
    linears (their norms and biases, if any, train in full). Returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    if rank <= 0:
        params = list(model.twin_parameters().values())
    else:
        g = torch.Generator().manual_seed(seed)
        params = []
        for _, _, lin in _twin_linears(model):
            delta = LowRankDelta(*lin.weight.shape, rank, g).to(lin.weight.device)
            parametrize.register_parametrization(lin, "weight", delta)
            params += [delta.lora_A, delta.lora_B]
        params += [p for n, p in model.twin_parameters().items() if "parametrizations" not in n]  # norms, biases
    for p in params:
        p.requires_grad_(True)
    return params


def trainable_state(model: OrthrusModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: OrthrusModel, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def lowrank_factors(model: OrthrusModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Head tensors of a low-rank run: `...qkv_proj_diff.lora_{A,B}`, `...o_proj_diff.lora_{A,B}` (in
    `dtype`: bf16 halves the file), and any full twin norms/biases under their official names."""
    out = {}
    for i, kind, lin in _twin_linears(model):
        delta = lin.parametrizations.weight[0]
        out[lowrank_key(i, kind, "A")] = delta.lora_A.detach().to("cpu", dtype).contiguous()
        out[lowrank_key(i, kind, "B")] = delta.lora_B.detach().to("cpu", dtype).contiguous()
    with parametrize.cached():
        full = twin_state_dict(model)
    out.update({k: v for k, v in full.items() if "norm_diff" in k or k.endswith(".bias")})
    return out


def merge_lowrank(model: OrthrusModel) -> None:
    """Fold the deltas into the twin weights (for inference after training)."""
    for _, _, lin in _twin_linears(model):
        if parametrize.is_parametrized(lin, "weight"):
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def load_lowrank_factors(model: OrthrusModel, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of `lowrank_factors`: continue training from a low-rank head. A head of lower rank
    fills the first components; the others start as new ones do (B = 0), so the twins are unchanged."""
    for i, kind, lin in _twin_linears(model):
        delta = lin.parametrizations.weight[0]
        a, b = tensors[lowrank_key(i, kind, "A")], tensors[lowrank_key(i, kind, "B")]
        delta.lora_A[: a.shape[0]].copy_(a)
        delta.lora_B[:, : b.shape[1]].copy_(b)
    load_tensors(model, ((k, v) for k, v in tensors.items() if ".lora_" not in k), only_twins=True)
