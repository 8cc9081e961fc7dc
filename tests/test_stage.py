"""Pipeline stages loaded straight from safetensors: bit-identical to the full model, holding and reading only their
own layers, with real rotary frequencies, and bad checkpoints refused by name."""

from __future__ import annotations

import functools
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from cna_dist.capture import hf
from cna_dist.capture.engines import balanced
from cna_dist.capture.hf import mask_maker
from cna_dist.capture.single import Capturer
from cna_dist.capture.stage import Stage, load_stage
from cna_dist.demo.models import save_random_model
from cna_dist.errors import BadInput
from cna_dist.prompts.batching import Batch, collate

LENGTHS = (1, 4, 11, 29)  # very different lengths: most rows are mostly padding


@functools.cache
def reference(path: Path, dtype: str) -> tuple[Batch, list[torch.Tensor], torch.Tensor]:
    """(batch, each layer's output hidden states, down_proj inputs at the last token [row, layer, neuron], float32)
    of the full model, through the same Capturer single-device capture uses (float32 holds every model dtype's
    values exactly)."""
    model, tokenizer = hf.load(path, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]
    batch = collate(prompts, list(range(len(prompts))), tokenizer.pad_token_id)
    hidden: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, a, out: hidden.append(out)) for layer in hf.decoder(model).layers]
    with torch.inference_mode():  # the whole stack (capture stops at the last down_proj input)
        Stage.of_model(model)(batch.input_ids, batch.attention_mask)
    for hook in hooks:
        hook.remove()
    with Capturer(model) as capturer:
        overflow = torch.zeros((), dtype=torch.int64)
        acts = torch.from_numpy(capturer.submit(batch, "float32", overflow).result().copy())
    return batch, hidden, acts


def run_chain(stages: list[Stage], batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each stage's output and the down_proj inputs at the last token, stage after stage as the pipeline runs."""
    rows: list[torch.Tensor] = []
    hooks = [
        proj.register_forward_pre_hook(lambda m, args: rows.append(args[0][:, -1].clone()))
        for stage in stages
        for proj in stage.down_projs()
    ]
    outputs, x = [], batch.input_ids
    for stage in stages:
        x = stage(x, batch.attention_mask)
        outputs.append(x)
    for hook in hooks:
        hook.remove()
    return outputs, torch.stack(rows, dim=1)


def check_chain(path: Path, split: list[tuple[int, int]], dtype: str = "float32") -> list[Stage]:
    batch, hidden, acts = reference(path, dtype)
    stages = [load_stage(path, lo, hi, dtype=dtype) for lo, hi in split]
    outputs, rows = run_chain(stages, batch)
    for (_, hi), out in zip(split, outputs, strict=True):
        assert out.dtype == hidden[hi - 1].dtype
        assert torch.equal(out, hidden[hi - 1]), f"hidden states after layer {hi - 1} differ"
    assert torch.equal(rows.float(), acts)
    return stages


SPLITS = {
    "tiny_llama": [[(0, 1), (1, 4)], [(0, 2), (2, 3), (3, 4)], [(0, 4)], balanced(4, 3)],
    "tiny_qwen": [[(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)], [(0, 3)]],
}


@pytest.mark.parametrize(("model", "split"), [(m, s) for m, splits in SPLITS.items() for s in splits])
def test_chained_stages_equal_the_full_model(request: pytest.FixtureRequest, model: str, split: list) -> None:
    """Same ops on the same shapes in the same order: bit-identical, not merely close."""
    check_chain(request.getfixturevalue(model), split)


def test_bfloat16_stages_equal_the_full_model(tiny_llama: Path) -> None:
    check_chain(tiny_llama, [(0, 2), (2, 4)], dtype="bfloat16")


def with_config(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of a checkpoint with config.json changed (a None value drops the key)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return dst


WINDOWED = {
    "mistral": {"sliding_window": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, "layer_types": None},
}


@pytest.mark.parametrize("arch", sorted(WINDOWED))
def test_batches_wider_than_the_sliding_window(tmp_path: Path, arch: str) -> None:
    """Past the window the device mask hands the 2D mask on and transformers builds the masks; so do the stages
    (for Qwen2 a different one per layer type), and the window really changes the result."""
    base = save_random_model(tmp_path / "base", arch=arch, n_layers=3, hidden_size=32, intermediate_size=48, seed=3)
    path = with_config(base, tmp_path / "windowed", **WINDOWED[arch])
    stages = check_chain(path, [(0, 1), (1, 2), (2, 3)])
    batch = reference(path, "float32")[0]
    assert mask_maker(stages[0].config)(batch.attention_mask).dim() == 2
    unwindowed, _ = run_chain([load_stage(base, 0, 3)], batch)
    assert not torch.equal(unwindowed[0], reference(path, "float32")[1][-1])


def test_a_stage_holds_only_its_layers(tiny_llama: Path) -> None:
    model, _ = hf.load(tiny_llama, dtype="float32")
    full = dict(model.named_parameters())
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in hf.decoder(model).layers]
    embedding = hf.decoder(model).embed_tokens.weight.numel()
    for lo, hi in [(0, 1), (1, 3), (3, 4)]:
        stage = load_stage(tiny_llama, lo, hi)
        assert stage.first == (lo == 0) and (stage.embed_tokens is not None) == (lo == 0)
        count = sum(p.numel() for p in stage.parameters())
        assert count == sum(per_layer[lo:hi]) + (embedding if lo == 0 else 0)
        assert [layer.self_attn.layer_idx for layer in stage.layers] == list(range(lo, hi))
        assert len(stage.down_projs()) == hi - lo
        for name, param in stage.named_parameters():  # and every value is the full model's
            if name.startswith("layers."):
                _, idx, rest = name.split(".", 2)
                name = f"layers.{lo + int(idx)}.{rest}"
            assert torch.equal(param, full[f"model.{name}"]), name


class Recorder:
    """Wraps safetensors.safe_open: which files were opened and which tensors read (a handle offers nothing else)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.files: list[str] = []
        self.keys: list[str] = []
        self.real = safetensors.safe_open
        monkeypatch.setattr(safetensors, "safe_open", self.open)

    def open(self, filename: str, framework: str, device: str = "cpu") -> Handle:
        assert framework == "pt"
        self.files.append(Path(filename).name)
        return Handle(self.real(filename, framework=framework, device=device), self)


class Handle:
    def __init__(self, inner: Any, recorder: Recorder):
        self.inner, self.recorder = inner, recorder

    def __enter__(self) -> Handle:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)

    def keys(self) -> list[str]:
        return self.inner.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        self.recorder.keys.append(key)
        return self.inner.get_tensor(key)


def stage_keys(path: Path, lo: int, hi: int) -> set[str]:
    """The checkpoint's own tensor names that belong to layers [lo, hi) (and the embedding when lo == 0)."""
    with safetensors.safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    wanted = {n for n in names if any(n.startswith(f"model.layers.{i}.") for i in range(lo, hi))}
    return wanted | ({"model.embed_tokens.weight"} if lo == 0 else set())


@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (1, 3), (3, 4)])
def test_loading_reads_only_the_stage_tensors(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, lo: int, hi: int):
    expected = stage_keys(tiny_llama, lo, hi)
    recorder = Recorder(monkeypatch)
    load_stage(tiny_llama, lo, hi)
    assert sorted(recorder.keys) == sorted(expected)  # each once, nothing else (no lm_head, no final norm)
    assert recorder.files == ["model.safetensors"]


@pytest.fixture(scope="module")
def sharded(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = hf.load(tiny_llama, dtype="float32")
    path = tmp_path_factory.mktemp("sharded") / "tiny-llama"
    model.save_pretrained(path, max_shard_size="20KB")
    return path


def test_sharded_checkpoint_loads_the_same_from_only_its_files(
    tiny_llama: Path, sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 3 and not (sharded / "model.safetensors").exists()
    expected = stage_keys(tiny_llama, 1, 3)
    recorder = Recorder(monkeypatch)
    stage = load_stage(sharded, 1, 3)
    assert sorted(recorder.keys) == sorted(expected)
    assert sorted(recorder.files) == sorted({weight_map[k] for k in expected})  # each file opened once
    single = load_stage(tiny_llama, 1, 3)
    assert stage.state_dict().keys() == single.state_dict().keys()
    for name, value in single.state_dict().items():
        assert torch.equal(stage.state_dict()[name], value), name


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rotary_frequencies_equal_the_full_model(request: pytest.FixtureRequest, model: str, dtype: str) -> None:
    """Computed, not loaded (no checkpoint holds inv_freq), and float32 even in a bfloat16 model, as in transformers."""
    path = request.getfixturevalue(model)
    full, _ = hf.load(path, dtype=dtype)
    rotary = hf.decoder(full).rotary_emb
    stage = load_stage(path, 1, 2, dtype=dtype)
    for name in ("inv_freq", "original_inv_freq"):
        ours, theirs = getattr(stage.rotary_emb, name), getattr(rotary, name)
        assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(ours, theirs), name
    assert stage.rotary_emb.attention_scaling == rotary.attention_scaling


def broken_copy(src: Path, dst: Path, **replace: torch.Tensor | None) -> Path:
    """config.json plus model.safetensors with some tensors replaced (None: dropped)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    for key, value in replace.items():
        tensors.pop(key)
        if value is not None:
            tensors[key] = value
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_missing_tensor_is_bad_input_naming_it(tiny_llama: Path, tmp_path: Path) -> None:
    key = "model.layers.1.mlp.up_proj.weight"
    path = broken_copy(tiny_llama, tmp_path / "m", **{key: None})
    with pytest.raises(BadInput, match=rf"model\.safetensors: tensor '{key}' is missing"):
        load_stage(path, 0, 2)
    load_stage(path, 2, 4)  # a stage that does not need it never notices


def test_a_wrongly_shaped_tensor_is_bad_input_naming_it_and_the_shapes(tiny_llama: Path, tmp_path: Path) -> None:
    key = "model.layers.2.self_attn.k_proj.weight"
    path = broken_copy(tiny_llama, tmp_path / "m", **{key: torch.zeros(16, 31)})
    with pytest.raises(BadInput, match=rf"model\.safetensors: tensor '{key}' has shape \[16, 31\], .* \[16, 32\]"):
        load_stage(path, 2, 3)


def test_a_tensor_missing_from_the_index_is_bad_input(sharded: Path, tmp_path: Path) -> None:
    path = tmp_path / "m"
    shutil.copytree(sharded, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.3.input_layernorm.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BadInput, match=r"index\.json: weight_map: tensor 'model\.layers\.3\.input_layernorm\.weight'"):
        load_stage(path, 3, 4)


def test_no_safetensors_is_bad_input(tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    shutil.copy(tiny_llama / "config.json", tmp_path / "m" / "config.json")
    with pytest.raises(BadInput, match="no model.safetensors"):
        load_stage(tmp_path / "m", 0, 1)


@pytest.mark.parametrize(("lo", "hi"), [(-1, 1), (2, 2), (3, 2), (0, 5)])
def test_a_range_outside_the_model_is_a_value_error(tiny_llama: Path, lo: int, hi: int) -> None:
    with pytest.raises(ValueError, match="range inside"):
        load_stage(tiny_llama, lo, hi)


def test_balanced_covers_every_layer_once_evenly() -> None:
    for n_layers in range(1, 30):
        for n_stages in range(1, n_layers + 1):
            ranges = balanced(n_layers, n_stages)
            assert len(ranges) == n_stages
            assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = [hi - lo for lo, hi in ranges]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes)  # the first stage, which also holds the embedding, is never the larger
    assert balanced(80, 4) == [(0, 20), (20, 40), (40, 60), (60, 80)]
    assert balanced(10, 4) == [(0, 2), (2, 4), (4, 7), (7, 10)]


@pytest.mark.parametrize(("n_layers", "n_stages"), [(4, 0), (4, -1), (4, 5), (0, 1)])
def test_balanced_refuses_impossible_splits(n_layers: int, n_stages: int) -> None:
    with pytest.raises(ValueError, match="cannot split"):
        balanced(n_layers, n_stages)
