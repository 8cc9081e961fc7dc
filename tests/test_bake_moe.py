"""`bake` on mixture-of-experts checkpoints (Mixtral, Qwen3-MoE, OLMoE): neuron e * I + j of a layer is column j
of expert e's down projection, in both layouts a checkpoint may hold (one tensor per expert, as these models are
published and as transformers saves them; or transformers 5's fused [E, H, I] tensor).

The oracle scales the expert's down-projection input inside HF's own (eager) experts forward: while it runs,
`torch.nn.functional.linear` is wrapped so that a call whose weight is a view of a layer's `experts.down_proj`
gets its input multiplied by that expert's scale vector. Nothing of HF's routing or weighting is re-implemented.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from cna_dist.demo.models import save_checkpoint
from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import DEFAULT_WORDS
from tests.test_bake import PROMPT, assert_within_rounding, bake, outputs, write_circuit

N_LAYERS, EXPERTS, WIDTH = 3, 4, 16
BASE = dict(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
FAMILIES = {
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(num_local_experts=EXPERTS, num_experts_per_tok=2, intermediate_size=WIDTH),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            moe_intermediate_size=WIDTH,
            intermediate_size=64,
            mlp_only_layers=[],
        ),
    ),
    "olmoe": (
        transformers.OlmoeConfig,
        transformers.OlmoeForCausalLM,
        dict(num_experts=EXPERTS, num_experts_per_tok=2, intermediate_size=WIDTH),
    ),
}
# experts 0..3 of several layers, first and last columns of an expert
PAIRS = [
    (0, 0),
    (0, 1 * WIDTH + 3),
    (0, 3 * WIDTH + WIDTH - 1),
    (1, 2 * WIDTH + 7),
    (1, 5),
    (2, 1 * WIDTH),
    (2, 3 * WIDTH + 2),
]


def build(family: str, seed: int) -> transformers.PreTrainedModel:
    cfg_cls, model_cls, extra = FAMILIES[family]
    tok = build_tokenizer(DEFAULT_WORDS)
    config = cfg_cls(
        vocab_size=len(tok),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **BASE,
        **extra,
    )
    model = model_cls(config).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    return model.eval()


def load(path: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()


@contextmanager
def experts_steered(model: transformers.PreTrainedModel, pairs: list[tuple[int, int]], m: float) -> Iterator[None]:
    """Multiply expert e's down-projection input j by m for every circuit neuron (layer, e * WIDTH + j)."""
    by_storage = {}
    for layer, block in enumerate(model.model.layers):
        w = block.mlp.experts.down_proj  # [EXPERTS, H, WIDTH]
        scale = torch.ones(w.shape[0], w.shape[2], dtype=w.dtype)
        for lay, n in pairs:
            if lay == layer:
                scale[n // w.shape[2], n % w.shape[2]] = m
        by_storage[w.untyped_storage().data_ptr()] = (w, scale)
    real = torch.nn.functional.linear

    def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        hit = by_storage.get(weight.untyped_storage().data_ptr())
        if hit is not None and weight.shape == hit[0].shape[1:]:
            w, scale = hit
            expert = (weight.storage_offset() - w.storage_offset()) // (w.shape[1] * w.shape[2])
            input = input * scale[expert].to(input.dtype)
        return real(input, weight, bias)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = real


def fused_checkpoint(model: transformers.PreTrainedModel, path: Path) -> Path:
    """The same model with its in-memory (fused, transformers 5) tensor names, which transformers loads as is."""
    save_checkpoint(model, build_tokenizer(DEFAULT_WORDS), path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_baked_equals_steered(family: str, tmp_path: Path) -> None:
    model = build(family, seed=7)
    per_expert = tmp_path / "per-expert"
    save_checkpoint(model, build_tokenizer(DEFAULT_WORDS), per_expert)
    fused = fused_checkpoint(model, tmp_path / "fused")
    names = {p.name for p in per_expert.glob("*.safetensors")}
    assert names and "experts.0." in (per_expert / sorted(names)[0]).read_bytes()[:4096].decode("latin-1")
    # per-expert layout: every multiplier and dtype; fused layout: one exact multiplier in float32
    for source, multipliers, dtypes in (
        (per_expert, (0.0, 2.0, 0.3), (torch.float32, torch.bfloat16)),
        (fused, (0.5,), (torch.float32,)),
    ):
        circuit = write_circuit(tmp_path / f"{source.name}.json", source, PAIRS, N_LAYERS, EXPERTS * WIDTH)
        for m in multipliers:
            bake(circuit, m, tmp_path / f"{source.name}-m{m}")
        for dtype in dtypes:
            steered = load(source, dtype)
            with torch.no_grad():
                plain = steered(PROMPT).logits
            for m in multipliers:
                with experts_steered(steered, PAIRS, m):
                    want = outputs(steered)
                assert not torch.equal(plain, want[0]), "the circuit must change the logits"
                got = outputs(load(tmp_path / f"{source.name}-m{m}", dtype))
                if m != 0.3:
                    assert torch.equal(got[0], want[0]), (family, source.name, m, dtype)
                    assert torch.equal(got[1], want[1]), (family, source.name, m, dtype)
                else:
                    assert_within_rounding(got[0], want[0])
