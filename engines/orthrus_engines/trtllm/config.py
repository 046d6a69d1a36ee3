"""`OrthrusDecodingConfig`: the speculative config that selects the ORTHRUS one-model mode.

It extends PARD's config (same request layout: 2 * max_draft_len tokens per generation request, so the
executor, the MTP-style sampler and the KV manager treat it as they treat PARD) and answers
`spec_dec_mode` with `SpeculativeDecodingMode.ORTHRUS`, which the shipped patch adds. Needs tensorrt_llm.
"""

from typing import Literal, Optional

from pydantic import Field, model_validator
from tensorrt_llm.llmapi.llm_args import PARDDecodingConfig

ANCHOR_VIEWS = ("diffusion", "ar", "causal")  # as orthrus_engines.models.loader


class OrthrusDecodingConfig(PARDDecodingConfig):
    """Orthrus: the model's own twin attentions draft `max_draft_len` tokens in one pass over
    `[anchor, MASK x max_draft_len]`; the AR view verifies them in the next target pass."""

    head_path: Optional[str] = Field(default=None, description="An Orthrus head file (full or low-rank twins) "
                                     "applied over the checkpoint at load; None: the checkpoint holds the twins.")
    anchor_view: Literal["diffusion", "ar", "causal"] = Field(
        default="diffusion", description="How the anchor row is computed: the twins, or the AR projections "
        "('ar'; 'causal' also hides the masks from the anchor).")

    @model_validator(mode="after")
    def _orthrus_draft_len(self):
        # the block [anchor, MASK x D] ends at most D + 1 slots past the iteration's 2D rows; the one-model
        # KV manager keeps D - 1 extra slots per sequence, so D >= 3 keeps the block inside its pages
        if self.max_draft_len is None or self.max_draft_len < 3:
            raise ValueError(f"Orthrus needs max_draft_len >= 3, got {self.max_draft_len}")
        return self

    @property
    def spec_dec_mode(self):
        from tensorrt_llm._torch.speculative.interface import SpeculativeDecodingMode

        return SpeculativeDecodingMode.ORTHRUS

    @property
    def anchor_ar(self) -> bool:
        return self.anchor_view in ("ar", "causal")

    @property
    def anchor_causal(self) -> bool:
        return self.anchor_view == "causal"


__all__ = ["OrthrusDecodingConfig", "ANCHOR_VIEWS"]
