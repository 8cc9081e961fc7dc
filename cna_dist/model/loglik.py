"""Log-likelihood of a continuation given a context: what multiple-choice capability tasks score.

Plain torch on a loaded causal LM, no lm-eval: the harness runs on the driver and sends token ids here, so a replica
needs neither the harness nor the task files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cna_dist.model.backend import Request
from cna_dist.model.batching import collate, plan_batches


@torch.inference_mode()
def loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[Request],
    pad_id: int,
    *,
    token_budget: int = 8192,
    max_batch_size: int = 16,
) -> list[tuple[float, bool]]:
    """Per request, the summed log-probability of the continuation and whether greedy decoding would produce it.

    The model reads context + continuation minus its last token, left-padded with positions counted from each row's
    first real token (as capture and generation do), so a batched row scores what it scores alone up to float
    rounding of the differently shaped kernels. Log-softmax in float32, sums in float64.
    """
    inputs: list[list[int]] = []
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {i}: context and continuation must both have tokens")
        inputs.append([*context, *continuation][:-1])
    device = model.get_input_embeddings().weight.device
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for indices in plan_batches([len(t) for t in inputs], token_budget, max_batch_size):
        batch = collate(inputs, indices, pad_id)
        mask = batch.attention_mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=positions).logits
        for row, i in enumerate(indices):
            target = torch.tensor(list(requests[i][1]), device=device)
            scores = logits[row, -len(target) :].float().log_softmax(-1)  # left padding: the continuation is last
            picked = scores.gather(-1, target[:, None])[:, 0]
            greedy = bool((scores.argmax(-1) == target).all())
            out[i] = (float(picked.double().sum()), greedy)
    return out
