"""`OrthrusForCausalLM` in TensorRT-LLM's PyTorch backend: Qwen3 with a twin (diffusion-view) attention per layer.

The twin of layer i holds only projections and norms (`qkv_proj`, `o_proj`, `q_norm`, `k_norm`), built
with TensorRT-LLM's `Linear` and the model's `Mapping`, column/row-parallel like the AR attention, so
tensor parallelism comes with it. It records the AR layer's `layer_idx` and runs its attention through
the AR layer's own attention backend, i.e. on the AR layer's KV pool: the twin pass writes its block's
K/V into the uncommitted tail slots, which the next verify pass overwrites with AR K/V (the contract of
`draft_kv="tail"`, proven on CPU). Not constructing a second `Attention` keeps the layer's
registration (one attention object per `layer_idx`) as the release expects.

Written against TensorRT-LLM at commit 051edebb7611 (see `orthrus_engines.trtllm`); needs the shipped patch.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Qwen3Config

from tensorrt_llm._torch.attention_backend.interface import PredefinedAttentionMask
from tensorrt_llm._torch.model_config import ModelConfig
from tensorrt_llm._torch.models.modeling_qwen3 import Qwen3DecoderLayer
from tensorrt_llm._torch.models.modeling_speculative import SpecDecOneEngineForCausalLM
from tensorrt_llm._torch.models.modeling_utils import DecoderModel, DecoderModelForCausalLM, register_auto_model
from tensorrt_llm._torch.modules.attention import Attention
from tensorrt_llm._torch.modules.embedding import Embedding
from tensorrt_llm._torch.modules.linear import Linear, TensorParallelMode, WeightMode, WeightsLoadingConfig
from tensorrt_llm._torch.modules.rms_norm import RMSNorm

from orthrus_engines.models.heads import read_head_metadata
from orthrus_engines.trtllm.weights import orthrus_weights
from orthrus_engines.trtllm.worker import OrthrusWorker


@dataclass
class DraftRows:
    """Set for the duration of a twin pass: `ar_rows` (or None) use the AR projections (the anchors of
    an `anchor_view: "ar"/"causal"` head); every other row uses the twin."""

    ar_rows: Optional[torch.Tensor]


class DraftState:
    """Shared by the model's layers: the current pass is a twin pass when `rows` is set."""

    def __init__(self):
        self.rows: Optional[DraftRows] = None


class TwinProjections(nn.Module):
    """The diffusion view of one attention layer: fused QKV, output projection, per-head q/k norms."""

    def __init__(self, model_config: ModelConfig[Qwen3Config], layer_idx: int):
        super().__init__()
        config = model_config.pretrained_config
        self.layer_idx = layer_idx  # the AR layer's: its KV pool is the one the twin pass reads and writes
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias,
                               dtype=config.torch_dtype, mapping=model_config.mapping,
                               tensor_parallel_mode=TensorParallelMode.COLUMN,
                               weights_loading_config=WeightsLoadingConfig(weight_mode=WeightMode.FUSED_QKV_LINEAR),
                               quant_config=model_config.get_quant_config(),
                               skip_create_weights_in_init=model_config.skip_create_weights_in_init)
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.attention_bias, dtype=config.torch_dtype,
                             mapping=model_config.mapping, tensor_parallel_mode=TensorParallelMode.ROW,
                             quant_config=model_config.get_quant_config(),
                             skip_create_weights_in_init=model_config.skip_create_weights_in_init)
        self.q_norm = RMSNorm(hidden_size=head_dim, eps=config.rms_norm_eps, dtype=config.torch_dtype)
        self.k_norm = RMSNorm(hidden_size=head_dim, eps=config.rms_norm_eps, dtype=config.torch_dtype)
        self.head_dim = head_dim


def _norm_heads(norm: RMSNorm, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return norm(x.reshape(-1, head_dim)).reshape(x.shape)


def _split_qkv_rope(attn, qkv: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm, position_ids):
    """q, k, v of one view: per-head q/k norms (the view's own), then the AR module's rotary embedding
    (the base `Attention.apply_rope`: rope is the same for both views)."""
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = _norm_heads(q_norm, q, attn.head_dim), _norm_heads(k_norm, k, attn.head_dim)
    return Attention.apply_rope(attn, q, k, v, position_ids)


def _take_rows(base, ar, rows: torch.Tensor):
    return None if base is None else base.index_copy(0, rows, ar[rows])


class OrthrusDecoderLayer(Qwen3DecoderLayer):
    def __init__(self, model_config: ModelConfig[Qwen3Config], layer_idx: int, draft: DraftState):
        super().__init__(model_config, layer_idx)
        self.self_attn.twin = TwinProjections(model_config, layer_idx)
        self._draft = draft

    def _twin_attention(self, position_ids, hidden_states, attn_metadata, rows: DraftRows) -> torch.Tensor:
        attn, twin = self.self_attn, self.self_attn.twin
        q, k, v = _split_qkv_rope(attn, twin.qkv_proj(hidden_states), twin.q_norm, twin.k_norm, position_ids)
        ar_out = None
        if rows.ar_rows is not None:
            aq, ak, av = _split_qkv_rope(attn, attn.qkv_proj(hidden_states), attn.q_norm, attn.k_norm, position_ids)
            q, k, v = (_take_rows(t, a, rows.ar_rows) for t, a in ((q, aq), (k, ak), (v, av)))
        out = attn.forward_impl(q, k, v, attn_metadata, attention_mask=PredefinedAttentionMask.CAUSAL,
                                attention_window_size=None, attention_mask_data=None, mrope_config=None)
        if isinstance(out, tuple):
            out = out[0]
        result = twin.o_proj(out)
        if rows.ar_rows is not None:  # both output projections all-reduce every row; the AR rows take the AR's
            ar_out = attn.o_proj(out)
            result = _take_rows(result, ar_out, rows.ar_rows)
        return result

    def forward(self, position_ids, hidden_states, attn_metadata, residual, mrope_config=None, spec_metadata=None,
                **kwargs):
        rows = self._draft.rows
        if rows is None:
            return super().forward(position_ids, hidden_states, attn_metadata, residual, mrope_config=mrope_config,
                                   spec_metadata=spec_metadata, **kwargs)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self._twin_attention(position_ids, hidden_states, attn_metadata, rows)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class OrthrusModel(DecoderModel):
    """Qwen3Model's structure with Orthrus layers (written out: building Qwen3Model first would allocate
    every layer twice)."""

    def __init__(self, model_config: ModelConfig[Qwen3Config]):
        super().__init__(model_config)
        config = model_config.pretrained_config
        self.draft = DraftState()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=config.torch_dtype,
                                      mapping=model_config.mapping, tensor_parallel_mode=TensorParallelMode.COLUMN,
                                      gather_output=True)
        self.layers = nn.ModuleList([OrthrusDecoderLayer(model_config, i, self.draft)
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(hidden_size=config.hidden_size, eps=config.rms_norm_eps, dtype=config.torch_dtype)

    def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None, mrope_config=None,
                spec_metadata=None, **kwargs) -> torch.Tensor:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(position_ids=position_ids, hidden_states=hidden_states,
                                            attn_metadata=attn_metadata, residual=residual,
                                            mrope_config=mrope_config, spec_metadata=spec_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def twin_forward(self, input_ids, position_ids, attn_metadata, ar_rows: Optional[torch.Tensor]) -> torch.Tensor:
        """One twin pass over the draft blocks (the worker has set the attention metadata)."""
        self.draft.rows = DraftRows(ar_rows)
        try:
            return self.forward(attn_metadata, input_ids=input_ids, position_ids=position_ids)
        finally:
            self.draft.rows = None


@register_auto_model("OrthrusForCausalLM")
class OrthrusForCausalLM(SpecDecOneEngineForCausalLM[OrthrusModel, Qwen3Config]):
    """Target and drafter in one network. `SpecDecOneEngineForCausalLM.__init__` is bypassed (it would build
    a separate draft model); the attributes the executor reads are set here and the worker is built directly."""

    def __init__(self, model_config: ModelConfig[Qwen3Config]):
        DecoderModelForCausalLM.__init__(self, OrthrusModel(model_config), config=model_config,
                                         hidden_size=model_config.pretrained_config.hidden_size,
                                         vocab_size=model_config.pretrained_config.vocab_size)
        self.draft_model = None
        self.draft_config = None
        self.use_separate_draft_kv_cache = False
        self.spec_config = getattr(model_config, "spec_config", None)
        self.spec_worker = None
        if self.spec_config is not None:
            if not self.spec_config.spec_dec_mode.is_orthrus():
                raise ValueError(f"OrthrusForCausalLM runs the ORTHRUS mode, not {self.spec_config.spec_dec_mode}")
            self.spec_worker = OrthrusWorker(self.spec_config, model_config.mapping)

    def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None,
                return_context_logits: bool = False, spec_metadata=None, resource_manager=None, **kwargs):
        hidden_states = self.model(attn_metadata, input_ids=input_ids, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, spec_metadata=spec_metadata, **kwargs)
        if spec_metadata is None or self.spec_worker is None:
            return self.logits_processor.forward(hidden_states, self.lm_head, attn_metadata, return_context_logits)
        logits = self.logits_processor.forward(hidden_states, self.lm_head, attn_metadata, True)
        return self.spec_worker(input_ids=input_ids, position_ids=position_ids, hidden_states=hidden_states,
                                logits=logits, attn_metadata=attn_metadata, spec_metadata=spec_metadata,
                                draft_model=self, resource_manager=resource_manager)

    def load_draft_weights(self, *args, **kwargs) -> None:
        """Nothing to load: the drafter is this network's twins, loaded with the main weights (the mode is a
        parallel-draft mode, so the executor calls this with `speculative_model`: point it at the same checkpoint)."""

    def load_weights(self, weights, *args, **kwargs):
        """The checkpoint's twins renamed onto `self_attn.twin`, a head file (full or low-rank) merged first."""
        cfg = self.model_config.pretrained_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        head_path = getattr(self.spec_config, "head_path", None)
        head = load_file(head_path) if head_path else None
        if head_path and getattr(self.spec_config, "mask_token_id", None) is None:
            meta = read_head_metadata(head_path)
            if "mask_token_id" in meta:
                self.spec_config.mask_token_id = int(meta["mask_token_id"])
        renamed = orthrus_weights(dict(weights), head, cfg.num_hidden_layers, cfg.num_attention_heads,
                                  cfg.num_key_value_heads, head_dim)
        return super().load_weights(renamed, *args, **kwargs)
