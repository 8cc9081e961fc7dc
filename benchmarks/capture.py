"""Benchmark: batched activation capture vs the one-prompt-at-a-time reference method.

Why: ``cna_dist.capture.capture`` packs prompts into length-sorted, padded batches and reads the last-token
input of every ``mlp.down_proj``. The reference (NousResearch/neural-steering's ``discover_contrastive``) runs
the full model once per prompt with forward pre-hooks. This script measures both in one process, on the same
random Llama checkpoint and prompts, reports prompts/s, tokens/s and the ratio, and checks the results agree.

Run from the repository root:

    .venv/bin/python benchmarks/capture.py [--n 256] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reference import reference  # benchmarks/reference.py, beside this script

from cna_dist.capture import hf
from cna_dist.capture import single as cap
from cna_dist.demo.models import save_random_model
from cna_dist.demo.words import demo_prompts
from cna_dist.prompts import sets as prompts_mod

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "harmless_train.json"


def load_texts(n: int) -> tuple[list[str], str]:
    """First ``n`` harmless instructions, or the tiny demo prompts repeated to ``n`` if the dataset is absent."""
    if DATASET.exists():
        items = json.loads(DATASET.read_text())
        return [item["instruction"] for item in items[:n]], str(DATASET)
    demo = [text for values in demo_prompts().values() for text in values]
    texts = [demo[i % len(demo)] for i in range(n)]
    return texts, f"FALLBACK: {DATASET} absent, using cna_dist.demo_prompts() repeated to {n}"


def llama_and_prompts(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, list[list[int]], str]:
    """The benchmark's random Llama (`--layers`, `--hidden`, `--intermediate`) and `--n` chat-rendered prompts."""
    texts, source = load_texts(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_model(
            Path(tmp) / "model",
            arch="llama",
            n_layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            n_heads=8,
            n_kv_heads=4,
            seed=0,
        )
        model, tokenizer = hf.load(path, dtype="float32")
    token_ids = [prompts_mod.encode(tokenizer, prompts_mod.render(tokenizer, t, chat=True), chat=True) for t in texts]
    return model, tokenizer, token_ids, source


def project(model: torch.nn.Module, token_ids: list[list[int]], pad_id: int, args: argparse.Namespace) -> np.ndarray:
    with cap.Capturer(model) as capturer:
        out, _ = cap.capture_with(
            capturer, token_ids, pad_id, dtype="float16", token_budget=args.token_budget, max_batch_size=args.batch
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="number of prompts")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=64, help="max batch size for the project method")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    model, tokenizer, token_ids, source = llama_and_prompts(args)
    pad_id = tokenizer.pad_token_id
    n_prompts = len(token_ids)
    n_tokens = sum(len(ids) for ids in token_ids)

    warm = token_ids[:4]
    project(model, warm, pad_id, args)
    reference(model, warm)

    times: dict[str, list[float]] = {"project": [], "reference": []}
    ratios = []
    proj_out = ref_out = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        proj_out = project(model, token_ids, pad_id, args)
        t1 = time.perf_counter()
        ref_out = reference(model, token_ids)
        t2 = time.perf_counter()
        times["project"].append(t1 - t0)
        times["reference"].append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))

    scale = float(np.abs(ref_out).max())
    rel_diff = float(np.abs(proj_out.astype(np.float32) - ref_out).max()) / scale

    figures: dict = {
        "source": source,
        "n_prompts": n_prompts,
        "n_tokens": n_tokens,
        "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate},
        "token_budget": args.token_budget,
        "max_batch_size": args.batch,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "rel_max_abs_diff": rel_diff,
    }
    print(f"prompts: {source}")
    print(
        f"{n_prompts} prompts, {n_tokens} tokens (mean {n_tokens / n_prompts:.1f}); model llama "
        f"layers={args.layers} hidden={args.hidden} intermediate={args.intermediate}; "
        f"torch threads={torch.get_num_threads()}"
    )
    print(f"{'method':<10} {'median s':>9} {'prompts/s':>10} {'tokens/s':>10}   runs (s)")
    for name, ts in times.items():
        med = statistics.median(ts)
        figures[name] = {
            "seconds": ts,
            "median_s": med,
            "prompts_per_s": n_prompts / med,
            "tokens_per_s": n_tokens / med,
        }
        runs = " ".join(f"{t:.2f}" for t in ts)
        print(f"{name:<10} {med:>9.3f} {n_prompts / med:>10.1f} {n_tokens / med:>10.0f}   {runs}")
    ratio = statistics.median(ratios)
    figures["ratio_median"] = ratio
    figures["ratios"] = ratios
    print(f"agreement: max |project(fp16) - reference(fp32)| / max |act| = {rel_diff:.2e} (max |act| {scale:.3g})")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"wrote {args.json}")
    print(f"ratio (project / reference, median of {args.repeats}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
