"""Gemma 3 text models (`Gemma3ForCausalLM`, model_type `gemma3_text`): interleaved sliding-window and
full-attention layers (5 of every 6 sliding in the checkpoints), GQA/MQA, head dim 256.

What matters to attention (read in transformers 5.17 and 5.25, `models/gemma3/modeling_gemma3.py`):

* Layers follow `config.layer_types` ("sliding_attention" / "full_attention"); a sliding layer gets
  `config.sliding_window` (key `j` visible from query `p` iff `p - j < window`, the rule of
  Mistral/Qwen2; the module also passes `sliding_window=` to the attention function). The masks come from
  `create_causal_mask` / `create_sliding_window_causal_mask`, so they reach the attention function in
  attnpatch's closed form.
* The softmax scale is `query_pre_attn_scalar ** -0.5`, not `head_dim ** -0.5` (equal in Gemma-3-270m,
  256 both); transformers passes it as `scaling=` and attnpatch uses what it is given.
* q and k go through a per-head RMS norm, then RoPE with a base per layer type (10K sliding, 1M full),
  all inside the module before attention: nothing for attnpatch to do.
* No attention-logit softcapping: `attn_logit_softcapping` is read into the module but never passed to
  the attention function (Gemma 2 passed `softcap=`; Gemma 3 does not, in either version). Only the
  final logits may be softcapped, outside attention.
* `use_bidirectional_attention=True` (EmbeddingGemma-style encoders) makes attention non-causal: refused,
  since every attnpatch method assumes causal attention.

The multimodal `Gemma3ForConditionalGeneration` (model_type `gemma3`) is refused as a whole: patching
it would switch the SigLIP vision tower's attention too and hook a base model whose config is not a
decoder's, and its image tokens attend bidirectionally within an image (an `or_mask_function` overlay).
Its language model, `model.model.language_model` (a `gemma3_text` model), can be patched on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnpatch.adapters.base import FamilyAdapter, UnsupportedModelError, register_adapter, register_hint


@dataclass(frozen=True)
class Gemma3Adapter(FamilyAdapter):
    def text_config(self, config: Any) -> Any:
        text = super().text_config(config)
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"{self.model_type} with use_bidirectional_attention=True attends bidirectionally (an "
                "encoder, e.g. EmbeddingGemma); attnpatch methods assume causal attention"
            )
        return text


GEMMA3_TEXT = register_adapter(Gemma3Adapter(
    "gemma3_text",
    notes="sliding window from layer_types (5 of 6 layers in the checkpoints); scale "
          "query_pre_attn_scalar**-0.5 (passed as scaling); q/k RMS norm before RoPE; no attention "
          "softcapping",
))
register_hint("gemma3", "the multimodal Gemma3ForConditionalGeneration: patch its language model, "
              "model.model.language_model, for text prompts")
