"""`steer`: one prompt, generated with and without the circuit scaled by m, side by side."""

from __future__ import annotations

import math

from cna_dist.capture import hf
from cna_dist.circuit import file as circuitmod
from cna_dist.errors import BadInput
from cna_dist.eval.metrics import is_refusal
from cna_dist.model import checkpoint, weights
from cna_dist.prompts import sets as promptsmod
from cna_dist.prompts.batching import Limits


def side_by_side(
    model_uri: str, circuit_uri: str, multiplier: float, max_new_tokens: int, dtype: str, prompt: str
) -> str:
    if not math.isfinite(multiplier):
        raise BadInput(f"expected a finite number, got {multiplier}", field="--multiplier")
    c = circuitmod.load(circuit_uri)
    config = checkpoint.read_config(model_uri, field="--model")
    info = checkpoint.info_from_config(config, model_uri)
    if checkpoint.fingerprint(model_uri) != c.model.fingerprint:
        raise BadInput(f"circuit {c.name} v{c.version} was mined on {c.model.uri}, not this model", field="--model")
    circuitmod.check_fits(c, info.n_layers, info.intermediate_size, circuit_uri)
    local = checkpoint.localize(model_uri)
    weights.check(str(local), config, field="--model")
    tokenizer = checkpoint.load_tokenizer(local)  # the prompt is rendered here, as eval's driver renders its own
    chat = promptsmod.use_chat_template(tokenizer, None)
    ids = [promptsmod.encode(tokenizer, promptsmod.render(tokenizer, prompt, chat), chat)]
    generator = hf.HFBackend.load(local, dtype=dtype, trust_remote_code=False)  # steer has no manifest to allow it
    try:
        limits = Limits(max_batch_size=1)
        (plain,) = generator.generate(ids, {}, max_new_tokens, limits)  # no condition: no hooks, m = 1 exactly
        condition = {"pairs": [list(p) for p in c.pairs()], "multiplier": multiplier}
        (steered,) = generator.generate(ids, condition, max_new_tokens, limits)
    finally:
        generator.close()
    return (
        f"prompt: {prompt}\n"
        f"--- m=1 (no intervention){' [refusal]' if is_refusal(plain) else ''}\n{plain.strip()}\n"
        f"--- m={multiplier:g} ({len(c.neurons)} neurons){' [refusal]' if is_refusal(steered) else ''}\n"
        f"{steered.strip()}"
    )
