"""Benchmark: single-device capture through the one `Stage` forward vs through HF's own decoder forward.

Why: every engine now runs `cna_dist.capture.stage.Stage.forward`; single-device capture used to call the loaded
model's decoder (`model.model(...)`) with hooks on every down_proj. This script runs both on the same random Llama
checkpoint and prompts in one process, alternating them run by run (so machine load hits both alike), prints
wall and CPU seconds (this process's CPU time: on a shared machine it varies far less than wall time), the
median per-run ratios, and checks the rows are bit-identical.

Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/forward_paths.py [--n 128] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from capture import llama_and_prompts  # benchmarks/capture.py, beside this script

from cna_dist.capture import hf
from cna_dist.capture import single as cap
from cna_dist.capture.plumbing import mask_maker, positions
from cna_dist.model.rows import LastTokenRows
from cna_dist.prompts.batching import Batch


class HFDecoderCapturer(cap.Capturer):
    """The baseline: the same batching, recorder and store conversion, but the forward is HF's decoder module."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self._rows.close()
        self._rows = LastTokenRows(hf.down_projs(model))
        self._decoder = hf.decoder(model)
        self._mask = mask_maker(model.config)

    @torch.inference_mode()
    def _run(self, batch: Batch) -> torch.Tensor:
        ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        shape = (ids.shape[0], self.n_layers, self.intermediate_size)
        buffer = torch.empty(shape, dtype=self.stage.dtype, device=self.device)
        with self._rows.into(buffer):
            self._decoder(input_ids=ids, attention_mask=self._mask(mask), position_ids=positions(mask), use_cache=False)
        return buffer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="number of prompts")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each path")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer, token_ids, source = llama_and_prompts(args)
    pad = tokenizer.pad_token_id
    paths = {"stage": cap.Capturer(model), "hf_decoder": HFDecoderCapturer(model)}

    def run(name: str) -> np.ndarray:
        return cap.capture_with(paths[name], token_ids, pad, dtype="float16")[0]

    outs = {name: run(name) for name in paths}  # warm-up, and the rows to compare
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(args.repeats):
        for name in paths if i % 2 == 0 else reversed(paths):
            start, start_cpu = time.perf_counter(), time.process_time()
            run(name)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    identical = bool(np.array_equal(outs["stage"], outs["hf_decoder"]))

    n_tokens = sum(map(len, token_ids))
    print(f"prompts: {source}")
    print(f"{len(token_ids)} prompts, {n_tokens} tokens; llama layers={args.layers} hidden={args.hidden}")
    print(f"torch threads={torch.get_num_threads()}, {args.repeats} runs of each path, alternating")
    print(f"{'path':<11} {'wall s':>8} {'cpu s':>8} {'prompts/cpu-s':>14}   cpu runs (s)")
    figures: dict = {"n_prompts": len(token_ids), "n_tokens": n_tokens, "rows_bit_identical": identical}
    for name in paths:
        med_wall, med_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        figures[name] = {"wall_s": wall[name], "cpu_s": cpu[name], "median_wall_s": med_wall, "median_cpu_s": med_cpu}
        runs = " ".join(f"{t:.2f}" for t in cpu[name])
        print(f"{name:<11} {med_wall:>8.3f} {med_cpu:>8.3f} {len(token_ids) / med_cpu:>14.1f}   {runs}")
    for kind, times in (("wall", wall), ("cpu", cpu)):
        ratio = statistics.median(b / a for a, b in zip(times["stage"], times["hf_decoder"], strict=True))
        figures[f"{kind}_speed_stage_over_hf_decoder"] = ratio
        print(f"{kind} speed of stage vs hf_decoder (median of per-run ratios, >1 = stage faster): {ratio:.3f}")
    print(f"rows bit-identical: {identical}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    for capturer in paths.values():
        capturer.close()


if __name__ == "__main__":
    main()
