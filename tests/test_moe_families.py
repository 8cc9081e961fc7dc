"""Mixture-of-experts families through the project's own path: checkpoint check, capture, steering, validate, mine.

tests/test_moe.py proves the recorder and steering on HF models built in memory; here tiny checkpoints of each MoE
family are saved with save_pretrained (transformers keeps one tensor per expert on disk and fuses them on load)
and go through `hf.HFBackend` (the single-device engine every dense family also runs), `steer.steered`,
`cna-dist validate` and `cna-dist mine --in-process`. The oracle is test_moe's: one prompt, unpadded, each routed
expert's down-projection input recomputed from its weights, times the router weight HF's router returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from cna_dist.capture import hf
from cna_dist.cli import main
from cna_dist.demo.models import save_checkpoint
from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import DEFAULT_WORDS
from cna_dist.model import arch
from cna_dist.prompts.batching import Limits
from cna_dist.steer import hooks as steer
from tests.test_families import _workspace, prompts
from tests.test_moe import column_scaled
from tests.test_moe import oracle as moe_oracle

LIMITS = Limits(token_budget=40, max_batch_size=4)
_COMMON = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
_COMMON |= {"max_position_embeddings": 128, "num_experts_per_tok": 2, "num_hidden_layers": 2}

# model_type -> (config class, its expert settings); every layer a MoE layer (one row width)
MOE: dict[str, tuple[type, dict[str, Any]]] = {
    "mixtral": (transformers.MixtralConfig, {"intermediate_size": 8, "num_local_experts": 4}),
    "olmoe": (transformers.OlmoeConfig, {"intermediate_size": 8, "num_experts": 4}),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        {"intermediate_size": 24, "moe_intermediate_size": 8, "num_experts": 4, "norm_topk_prob": True},
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        {"intermediate_size": 24, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12, "num_experts": 4},
    ),
}


def test_every_moe_family_is_registered() -> None:
    assert set(MOE) == set(arch.MOE) and set(MOE) <= set(arch.known())


def build(model_type: str, path: Path, **changes: Any) -> Path:
    """A seeded random float32 checkpoint of the family with the demo tokenizer (norms left at 1)."""
    tok = build_tokenizer(DEFAULT_WORDS)
    cls, extra = MOE[model_type]
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = cls(vocab_size=len(tok), tie_word_embeddings=False, **(_COMMON | ids | extra | changes))
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32)
    gen = torch.Generator().manual_seed(sum(map(ord, model_type)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    save_checkpoint(model, tok, path)
    return path


def oracle_rows(path: Path, token_ids: list[list[int]]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    return np.stack([moe_oracle(model, ids)[0].reshape(n_layers, -1).numpy() for ids in token_ids])


@pytest.fixture(scope="module", params=sorted(MOE))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = build(request.param, tmp_path_factory.mktemp(request.param))
    return {"type": request.param, "path": path, "ids": prompts(len(build_tokenizer(DEFAULT_WORDS)))}


def test_single_device_rows_equal_the_oracle(family: dict[str, Any]) -> None:
    backend = hf.HFBackend.load(family["path"], dtype="float32", trust_remote_code=False)
    try:
        [(lo, hi, rows)], overflow = backend.capture_parts(family["ids"], "float32", LIMITS)
    finally:
        backend.close()
    expected = oracle_rows(family["path"], family["ids"])
    assert (lo, hi, overflow) == (0, 2, 0) and rows.shape == expected.shape
    assert backend.intermediate_size == expected.shape[2]  # E x I (+ the shared expert)
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    routed = 4 * 8
    nonzero = (rows[:, :, :routed].reshape(len(rows), 2, 4, 8) != 0).any(-1).sum(-1)
    assert (nonzero == 2).all()  # exactly top-2 experts carry values, the others are exactly 0


def test_steering_through_the_project(family: dict[str, Any]) -> None:
    """steer.steered picks the family's own steering: m = 1 bit-identical, m = 0 and 2 equal scaled columns."""
    model, _ = hf.load(family["path"], dtype="float32")
    ids = torch.tensor([family["ids"][0]])
    pairs = [(0, 1), (1, 8 + 3), (1, 4 * 8 - 1)] + ([(0, 4 * 8 + 2)] if family["type"] == "qwen2_moe" else [])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with steer.steered(model, pairs, 1.0):
            assert torch.equal(model(input_ids=ids).logits, base)
        for m in (0.0, 2.0):
            with steer.steered(model, pairs, m):
                got = model(input_ids=ids).logits
            undo = column_scaled(model, pairs, m)
            want = model(input_ids=ids).logits
            undo()
            assert not torch.equal(got, base)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mined_circuit_equals_an_oracle_reduce(tmp_path: Path) -> None:
    """`cna-dist mine --in-process` on an OLMoE checkpoint: top |delta| of the oracle rows, in order."""
    from cna_dist.model.checkpoint import load_tokenizer
    from cna_dist.prompts import sets as promptsmod
    from tests.conftest import HARMFUL, HARMLESS

    path = build("olmoe", tmp_path / "model", num_hidden_layers=4)
    manifest = _workspace(tmp_path / "ws", path)
    text = manifest.read_text().replace("  diverse: {uri: ./prompts/diverse.jsonl}", "")
    manifest.write_text(text + "capture: {dtype: float32}\n")
    result = CliRunner().invoke(main, ["mine", str(manifest), "--quiet", "--in-process"])
    assert result.exit_code == 0, result.output
    circuit = json.loads(Path(result.stdout.strip().splitlines()[-1]).read_text())
    assert circuit["model"]["intermediate_size"] == 4 * 8

    tok = load_tokenizer(path)
    chat = promptsmod.use_chat_template(tok, None)
    ids = {
        name: [promptsmod.encode(tok, promptsmod.render(tok, t, chat), chat) for t in texts]
        for name, texts in (("pos", HARMFUL), ("neg", HARMLESS))
    }
    pos, neg = oracle_rows(path, ids["pos"]), oracle_rows(path, ids["neg"])
    delta = pos.astype(np.float64).mean(0) - neg.astype(np.float64).mean(0)
    candidates = [(layer, n) for layer in (2, 3) for n in range(delta.shape[1])]  # exclude_layers [0, 1]
    want = sorted(candidates, key=lambda p: (-abs(delta[p]), p))[:40]
    assert [(n["layer"], n["neuron"]) for n in circuit["neurons"]] == want
    np.testing.assert_allclose([n["delta"] for n in circuit["neurons"]], [delta[p] for p in want], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "engine", ["auto", "stream", "pipeline\n  gpus_per_replica: 2\n  stages: [[0, 1], [1, 4]]"], ids=lambda e: e[:8]
)
def test_validate_accepts_every_engine_and_refuses_mixed_widths(tmp_path: Path, engine: str) -> None:
    """MoE checkpoints run on every capture engine (stages assemble fused experts: tests/test_moe_engines.py); a
    model mixing dense and MoE layers is refused on every engine, naming its widths."""

    def with_engine(manifest: Path) -> Path:
        text = manifest.read_text()
        manifest.write_text(
            text.replace("  uri: ./models/tiny-instruct", f"  uri: ./models/tiny-instruct\n  engine: {engine}")
        )
        return manifest

    ok = build("mixtral", tmp_path / "ok", num_hidden_layers=4)
    accepted = CliRunner().invoke(main, ["validate", str(with_engine(_workspace(tmp_path / "b", ok)))])
    assert accepted.exit_code == 0, accepted.output
    mixed = build("qwen3_moe", tmp_path / "mixed", mlp_only_layers=[0])
    refused = CliRunner().invoke(main, ["validate", str(with_engine(_workspace(tmp_path / "a", mixed)))])
    assert refused.exit_code == 2 and "layers of different widths [24, 32]" in refused.output
    assert not (tmp_path / "a" / "out").exists()
