"""Benchmark: loading one mixture-of-experts layer as a pipeline or stream stage, per-expert against fused tensors.

Why: the stream engine reads every layer's weights once per shard while the previous layer computes, so a layer's
load time sets how large a shard must be. Released MoE checkpoints hold one tensor per expert and part (128 experts
x 3 = 384 tensors a layer for Qwen3-MoE), which `load_stage` copies one by one into the layer's fused parameters;
a checkpoint saved fused (`save_pretrained(save_original_format=False)`) holds two. This script saves the same
2-layer Qwen3-MoE both ways (the real expert count and top-k, smaller hidden size and expert width, bfloat16), then
loads layer 1 from each, alternating, and prints the median wall seconds of each, the bytes and the ratio. The
loads are checked to give equal tensors.

Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/moe_stage_load.py [--hidden 512] [--width 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from moe_rows import build  # benchmarks/moe_rows.py, beside this script

from cna_dist.capture.stage import load_stage
from cna_dist.demo.scale import MOE_SHAPES


def timed(path: Path) -> float:
    start = time.perf_counter()
    load_stage(path, 1, 2, dtype="bfloat16")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--width", type=int, default=256, help="expert width (moe_intermediate_size)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(2, hidden=args.hidden, width=args.width, std=0.02).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        per_expert, fused = Path(tmp) / "per-expert", Path(tmp) / "fused"
        model.save_pretrained(per_expert)
        model.save_pretrained(fused, save_original_format=False)
        a, b = load_stage(per_expert, 1, 2, dtype="bfloat16"), load_stage(fused, 1, 2, dtype="bfloat16")
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()), "loads differ"
        nbytes = sum(p.numel() * p.element_size() for p in a.parameters())
        times: dict[str, list[float]] = {"per-expert": [], "fused": []}
        for _ in range(args.repeats):
            times["per-expert"].append(timed(per_expert))
            times["fused"].append(timed(fused))
    n_experts = MOE_SHAPES["qwen3_moe"][1]
    print(
        f"layer: {n_experts} experts x {args.width}, hidden {args.hidden}, bfloat16, {nbytes / 2**20:.1f} MiB; "
        f"median of {args.repeats}, {args.threads} thread(s)"
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"  {name:>10}: {value * 1e3:8.1f} ms  ({nbytes / value / 2**30:.2f} GiB/s)")
    print(f"  per-expert / fused: {medians['per-expert'] / medians['fused']:.2f}x")


if __name__ == "__main__":
    main()
