"""Benchmark: single-device capture through the one `Stage` forward vs through HF's own decoder forward.

Why: every engine now runs `cna_dist.model.stage.Stage.forward`; single-device capture used to call the loaded
model's decoder (`model.model(...)`) with hooks on every down_proj. This script runs both on the same random Llama
checkpoint and prompts in one process, alternating them run by run (so machine load hits both alike), prints
prompts/s and the median ratio, and checks the rows are bit-identical.

Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/forward_paths.py [--n 128] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from capture import load_texts  # benchmarks/capture.py, beside this script

from cna_dist.demo.models import save_random_model
from cna_dist.model import capture as cap
from cna_dist.model import hf
from cna_dist.model import prompts as prompts_mod
from cna_dist.model.batching import Batch
from cna_dist.model.plumbing import LastTokenRows, mask_maker, positions


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
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

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
    pad = tokenizer.pad_token_id
    paths = {"stage": cap.Capturer(model), "hf_decoder": HFDecoderCapturer(model)}

    def run(name: str) -> np.ndarray:
        return cap.capture_with(paths[name], token_ids, pad, dtype="float16")[0]

    outs = {name: run(name) for name in paths}  # warm-up, and the rows to compare
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(args.repeats):
        for name in paths if i % 2 == 0 else reversed(paths):
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    identical = bool(np.array_equal(outs["stage"], outs["hf_decoder"]))
    ratios = [b / a for a, b in zip(times["stage"], times["hf_decoder"], strict=True)]

    n_tokens = sum(map(len, token_ids))
    print(f"prompts: {source}")
    print(f"{len(token_ids)} prompts, {n_tokens} tokens; llama layers={args.layers} hidden={args.hidden}")
    print(f"{'path':<11} {'median s':>9} {'prompts/s':>10}   runs (s)")
    figures: dict = {"n_prompts": len(token_ids), "n_tokens": n_tokens, "rows_bit_identical": identical}
    for name, ts in times.items():
        med = statistics.median(ts)
        figures[name] = {"seconds": ts, "median_s": med, "prompts_per_s": len(token_ids) / med}
        print(f"{name:<11} {med:>9.3f} {len(token_ids) / med:>10.1f}   {' '.join(f'{t:.2f}' for t in ts)}")
    ratio = figures["speed_ratio_stage_over_hf_decoder"] = statistics.median(ratios)
    print(f"rows bit-identical: {identical}")
    print(f"speed of stage relative to hf_decoder (median of per-run time ratios, >1 = stage faster): {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    for capturer in paths.values():
        capturer.close()


if __name__ == "__main__":
    main()
