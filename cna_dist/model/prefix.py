"""A prefix every prompt of a capture shares is computed once, and every batch continues from its keys and values.

Why: chat-templated prompts start with the same tokens (the template's system turn and the user-turn header):
24 of SmolLM2-Instruct's 42 tokens per prompt on average, a Llama-3 template's date lines, a Qwen template's
system prompt. A causal decoder's states for those positions do not depend on what follows, so capture runs
them once (batch of one) and each batch runs only the rest of its prompts, attending to the shared keys and
values (expanded, not copied, over the batch's rows) and positioned after them. The last token, where a row is
read, is never in the prefix. Rows equal a full forward within float tolerance (the same math, other matmul
shapes).

Used only where that is plainly the same attention: SDPA, no sliding window and no per-layer attention types
(a window or a local layer would see a different past). Elsewhere, and for prefixes under `MIN_PREFIX` tokens,
capture runs whole prompts as before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

MIN_PREFIX = 8  # shorter shared prefixes save less than the extra forward costs


def supported(config: Any) -> bool:
    """Full causal SDPA attention in every layer: the prefix's keys and values serve every later position."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None):
        return False
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    return kinds == {"full_attention"}


def shared_length(token_ids: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least its last token; 0 when under MIN_PREFIX or one prompt."""
    if len(token_ids) < 2:
        return 0
    common = os.path.commonprefix([list(ids) for ids in token_ids])
    length = min(len(common), min(len(ids) for ids in token_ids) - 1)
    return length if length >= MIN_PREFIX else 0


class SharedPrefix:
    """The keys and values of a shared prefix (batch of one), and the decoder inputs that continue from them."""

    def __init__(self, decoder: Any, prefix: Sequence[int], device: torch.device):
        self.length = len(prefix)
        ids = torch.tensor([list(prefix)], dtype=torch.int64)
        if device.type == "cuda":  # pinned and asynchronous: capture never waits on the GPU outside its events
            ids = ids.pin_memory().to(device, non_blocking=True)
        else:
            ids = ids.to(device)
        with torch.inference_mode():
            out = decoder(input_ids=ids, use_cache=True)
        self._kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def inputs(self, mask: torch.Tensor) -> dict[str, Any]:
        """attention_mask (4D, boolean), position_ids and past_key_values for a left-padded batch of suffixes."""
        from transformers import DynamicCache

        rows, width = mask.shape
        positions = self.length + (mask.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones((width, width), dtype=torch.bool, device=mask.device).tril_()
        eye = torch.eye(width, dtype=torch.bool, device=mask.device)
        suffix = (causal & mask.bool()[:, None, :]) | eye  # a padding query sees itself: no row fully masked
        seen = torch.ones((rows, width, self.length), dtype=torch.bool, device=mask.device)
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self._kv]
        )
        return {
            "attention_mask": torch.cat([seen, suffix], dim=-1)[:, None],
            "position_ids": positions,
            "past_key_values": cache,
            "use_cache": True,
        }
