"""Benchmark: what recording mixture-of-experts rows adds to a forward pass, at Qwen3-235B-A22B's expert shape.

Why: the MoE row recorder (cna_dist.model.moe.MoeLastTokenRows) recomputes the routed experts' down-projection
inputs for the last token of every prompt, from the routing HF's experts forward receives. This script runs the
same decoder stack on the same left-padded batch with and without the recorder, alternating, and prints the median
wall and process CPU seconds of each and their ratios; then how well the rows' zeros compress in store-sized
chunks. The model has the real expert count, expert width and top-k (128 x 1536, top 8) with fewer layers and
hidden size 8, built in memory.

Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/moe_rows.py [--layers 8] [--batch 16] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import transformers

from cna_dist.demo.scale import MOE_SHAPES
from cna_dist.model import moe


def build(n_layers: int, hidden: int = 8, width: int | None = None, std: float = 0.15) -> torch.nn.Module:
    """A random Qwen3-MoE of the 235B model's expert count and top-k (and its expert width unless `width` is given)."""
    _, n_experts, real_width, top_k = MOE_SHAPES["qwen3_moe"]
    config = transformers.Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        moe_intermediate_size=real_width if width is None else width,
        num_hidden_layers=n_layers,
        num_experts=n_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        num_attention_heads=2 if hidden <= 8 else 4,
        num_key_value_heads=1 if hidden <= 8 else 2,
        head_dim=hidden // (2 if hidden <= 8 else 4),
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, std)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=24, help="longest prompt; the others are shorter")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a shared machine)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model = build(args.layers)
    gen = torch.Generator().manual_seed(1)
    lengths = [max(1, args.tokens - 2 * (i % 6)) for i in range(args.batch)]
    ids = torch.zeros(args.batch, args.tokens, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.randint(2, 512, (n,), generator=gen)
        mask[i, -n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    recorder = moe.MoeLastTokenRows(list(model.model.layers))
    buffer = torch.empty(args.batch, len(recorder.widths), recorder.widths[0])

    def forward(record: bool) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            if record:
                with recorder.into(buffer):
                    model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            else:
                model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        return time.perf_counter() - start, time.process_time() - cpu

    forward(False), forward(True)  # warm-up
    plain, recorded = [], []
    for _ in range(args.repeats):
        plain.append(forward(False))
        recorded.append(forward(True))
    recorder.close()
    p, r = statistics.median(t for t, _ in plain), statistics.median(t for t, _ in recorded)
    pc, rc = statistics.median(c for _, c in plain), statistics.median(c for _, c in recorded)
    print(f"model: {args.layers} layers x {recorder.widths[0]} neurons (128 experts x 1536, top 8), hidden 8")
    print(f"batch: {args.batch} prompts, {sum(lengths)} tokens; torch threads {torch.get_num_threads()}")
    print(f"forward, no recorder:   median wall {p:.3f} s, cpu {pc:.3f} s over {args.repeats}")
    print(f"forward, MoE recorder:  median wall {r:.3f} s, cpu {rc:.3f} s over {args.repeats}")
    print(f"ratio recorded / plain: wall {r / p:.3f}, cpu {rc / pc:.3f}")
    print(f"row: {sum(recorder.widths)} neurons, {sum(recorder.widths) * 2} bytes in float16 per prompt")
    zeros = (buffer == 0).float().mean().item()
    raw, packed = compressed(buffer.to(torch.float16).numpy())
    print(f"zeros: {zeros:.4f} of the row (top {MOE_SHAPES['qwen3_moe'][3]} of 128 experts routed)")
    print(f"store chunks (16 rows x 1 layer), zstd level 3: {packed} of {raw} bytes, ratio {raw / packed:.1f}x")


def compressed(rows: np.ndarray) -> tuple[int, int]:
    """(raw, zstd-compressed) bytes of the rows cut into the store's chunks for this row shape (16 rows x 1 layer:
    cna_dist.store.activations.chunking), each compressed on its own as a Zarr codec would."""
    from numcodecs import Zstd

    codec = Zstd(level=3)
    raw = packed = 0
    for start in range(0, rows.shape[0], 16):
        for layer in range(rows.shape[1]):
            chunk = np.ascontiguousarray(rows[start : start + 16, layer])
            raw += chunk.nbytes
            packed += len(codec.encode(chunk))
    return raw, packed


if __name__ == "__main__":
    main()
