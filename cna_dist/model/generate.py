"""Batched greedy generation, the one decoding every evaluation uses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cna_dist.prompts.batching import collate, plan_batches

# Pure argmax decoding whatever the checkpoint's generation_config.json says: sampling, beams and repetition
# penalties there (Llama-3 ships do_sample/temperature/top_p, Qwen2.5 a repetition_penalty) would make runs
# irreproducible or hide the degeneration the quality metric exists to measure. Passing these as generate()
# kwargs marks them user-set, so transformers does not warn about the config's inherited sampling flags.
GREEDY: dict[str, Any] = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    token_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    max_batch_size: int = 16,
    token_budget: int = 8192,
) -> list[str]:
    """Greedy completions (new tokens only), batched with left padding, in prompt order.

    transformers derives position ids from the attention mask (cumsum - 1), as capture does, so a left-padded
    row sees the positions and keys it would see alone: the text equals one-prompt-at-a-time generation, the
    logits differ only by float rounding of the differently shaped kernels (about 1e-6 in float32).
    """
    pad_id = tokenizer.pad_token_id
    device = model.get_input_embeddings().weight.device
    out: list[str] = [""] * len(token_ids)
    for indices in plan_batches([len(t) for t in token_ids], token_budget, max_batch_size):
        batch = collate(token_ids, indices, pad_id)
        generated = model.generate(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            **GREEDY,
        )
        for row, i in enumerate(indices):
            out[i] = tokenizer.decode(generated[row, batch.input_ids.shape[1] :], skip_special_tokens=True)
    return out
