"""GPU benchmark: the project's batched capture vs the one-prompt-at-a-time reference, on real model shapes.

Why: the capture is the GPU-heavy half of a mining run. This builds a random model of a real shape from its
config in code (Qwen2.5-7B, Llama-3.1-8B, one 20-layer pipeline stage of Qwen2.5-72B; weights created directly
on the device in bf16, nothing downloaded), draws synthetic token ids whose lengths follow the chat-rendered
length distribution of ../shared/datasets (rescaled to a target mean, default 64 tokens), and reports for both
methods in the same process prompts/s, tokens/s and MFU = 2 x non-embedding params x real tokens / time / peak
dense bf16 FLOP/s. It then runs the replica's overlapped shard path (compute under a lock, the previous shard's
store write beside it) against a local Zarr store and reports the GPU idle time the writes still cause.

    .venv/bin/python benchmarks/capture_gpu.py --shape qwen2.5-7b --prompts 2048 --repeats 3
    .venv/bin/python benchmarks/capture_gpu.py --shape qwen2.5-72b-stage --engine pipeline --stages 2
    .venv/bin/python benchmarks/capture_gpu.py --shape tiny --prompts 16 --repeats 1      # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reference import reference  # noqa: E402  (benchmarks/reference.py, beside this script)

from cna_dist.capture import single as cap  # noqa: E402
from cna_dist.prompts import sets as prompts_mod  # noqa: E402
from cna_dist.prompts.batching import Limits  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"
DATASET_FILES = ("harmful_train.json", "harmless_train.json")

# Real hyper-parameters (config.json of each checkpoint); random weights.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2.5-7b": (
        "qwen2",
        {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
        },
    ),
    "llama-3.1-8b": (
        "llama",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": False,
        },
    ),
    # Qwen2.5-72B has 80 layers; a 4-GPU pipeline replica gives each GPU 20 of them.
    "qwen2.5-72b-stage": (
        "qwen2",
        {
            "hidden_size": 8192,
            "intermediate_size": 29568,
            "num_hidden_layers": 20,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "vocab_size": 152064,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
        },
    ),
    "tiny": (
        "llama",
        {
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "vocab_size": 4096,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        },
    ),
}

# Dense bf16 tensor-core peak, TFLOP/s (no sparsity), by device-name substring; first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random model of `shape`, parameters allocated on `device` in `dtype` from the start, SDPA attention."""
    import transformers

    arch, hyper = SHAPES[shape]
    config_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[arch]
    config = config_cls(**hyper, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # weights are born on the GPU: no 30 GB host copy, no transfer
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def make_backend(model: torch.nn.Module, engine: str, n_stages: int) -> Any:
    """The replica backend over the built model. `pipeline`: stages on the model's device (one GPU: the machinery's
    overhead against the single-device run), each taking its layers' modules from the model, no copy."""
    from cna_dist.capture.hf import HFBackend

    if engine == "single":
        return HFBackend(model, SimpleNamespace(pad_token_id=0))
    from cna_dist.capture.engines import balanced
    from cna_dist.capture.pipeline import PipelineBackend
    from cna_dist.capture.stage import Stage

    inner, config = model.model, model.config
    device, dtype = inner.embed_tokens.weight.device, inner.embed_tokens.weight.dtype
    stages = []
    for lo, hi in balanced(config.num_hidden_layers, n_stages):
        stage = Stage(config, lo, hi, device="meta", dtype=dtype)  # no memory: its modules are the model's
        stage.device, stage.rotary_emb = device, inner.rotary_emb
        stage.layers = torch.nn.ModuleList(list(inner.layers[lo:hi]))
        stage.embed_tokens = inner.embed_tokens if lo == 0 else None
        stages.append(stage)
    return PipelineBackend(stages, pad_id=0)


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters the capture multiplies by: the decoder stack without the embedding (the lm_head is skipped)."""
    inner = model.model
    return sum(p.numel() for p in inner.parameters()) - inner.embed_tokens.weight.numel()


def dataset_lengths(n: int, target_mean: float | None, seed: int) -> tuple[list[int], str]:
    """Prompt lengths: half harmful, half harmless instructions rendered with a word-level chat template.

    The word-level tokenizer gives the distribution's shape; lengths are then scaled so the mean
    is `target_mean` (a real BPE tokenizer and system prompt make prompts longer than word counts).
    """
    rng = np.random.default_rng(seed)
    files = [DATASETS / f for f in DATASET_FILES]
    if all(f.exists() for f in files):
        from cna_dist.demo.tokenizer import build_tokenizer
        from cna_dist.demo.words import DEFAULT_WORDS

        tokenizer = build_tokenizer(DEFAULT_WORDS)
        pools = [[item["instruction"] for item in json.loads(f.read_text())] for f in files]
        picks = [pools[i % 2][int(rng.integers(len(pools[i % 2])))] for i in range(n)]
        raw = np.array(
            [len(prompts_mod.encode(tokenizer, prompts_mod.render(tokenizer, t, chat=True), chat=True)) for t in picks],
            dtype=np.float64,
        )
        source = (
            f"lengths of {n} prompts from {', '.join(str(f) for f in files)} (word-level chat rendering, "
            f"raw mean {raw.mean():.1f})"
        )
    else:
        raw = np.clip(rng.normal(64.0, 20.0, size=n), 16, 256)
        source = f"FALLBACK: {DATASETS} lacks {DATASET_FILES}; lengths ~ normal(64, 20) clipped to [16, 256]"
    if target_mean:
        raw = raw * (target_mean / raw.mean())
        source += f", scaled to mean {target_mean:g}"
    return [max(1, int(round(x))) for x in raw], source


def synthetic_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(3, vocab, size=length).tolist() for length in lengths]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device) -> tuple[float, Any]:
    """Wall time of a whole run; the device is synchronised before and after, never inside."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{value:g} TFLOP/s dense bf16 ({name})"
    return None, f"unknown for {name!r}: pass --peak-tflops"


def measure_writes(
    backend: Any, token_ids: list[list[int]], args: argparse.Namespace, store_dir: Path
) -> dict[str, Any]:
    """The replica's shard path as Ray runs it: two concurrent capture_shard calls per replica, the driver
    handing a replica its next shard when one returns, each shard written and committed to a local Zarr store.
    """
    from cna_dist.runtime.replica import Replica, ReplicaSpec
    from cna_dist.store.activations import ActivationStore, RunMeta

    meta = RunMeta(
        fingerprint="benchmark",
        model_uri="random",
        n_layers=backend.n_layers,
        intermediate_size=backend.intermediate_size,
        dtype=args.store_dtype,
        model_dtype=args.dtype,
        chat_template=True,
        shard_rows=args.shard_rows,
    )
    run = ActivationStore(str(store_dir)).open_run(meta)
    hashes = [f"{i:064x}" for i in range(len(token_ids))]
    plans = run.plan(hashes)
    spec = ReplicaSpec(
        "random", capture_dtype=args.store_dtype, token_budget=args.token_budget, max_batch_size=args.batch
    )
    replica = Replica(spec, backend)  # the model already built (no checkpoint to load)
    work: queue.Queue = queue.Queue()
    for plan in plans:
        work.put(plan)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def worker() -> None:  # one of the driver's two in-flight slots on this replica
        while True:
            try:
                plan = work.get_nowait()
            except queue.Empty:
                return
            try:
                results.append(replica.capture_shard(run, plan, [token_ids[int(h, 16)] for h in plan.hashes]))
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    if len(run.committed()) != len(plans):
        raise RuntimeError("a shard's commit marker is missing after the overlapped run")
    compute = sum(r.compute_seconds for r in results)
    write = sum(r.write_seconds for r in results)
    idle = sum(r.idle_seconds for r in results)
    return {
        "shards": len(plans),
        "shard_rows": run.meta.shard_rows,
        "wall_s": wall,
        "compute_s": compute,
        "write_s": write,
        "idle_s": idle,
        "idle_fraction": idle / wall if wall else 0.0,
        "serial_estimate_s": compute + write,
        "prompts_per_s": len(token_ids) / wall,
        "store_mb": run.nbytes() / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    parser.add_argument("--prompts", type=int, default=2048, help="prompts per timed project run")
    parser.add_argument(
        "--reference-prompts",
        type=int,
        default=256,
        help="prompts per timed reference run (it is slow; rates are per prompt)",
    )
    parser.add_argument("--tokens", type=float, default=64.0, help="target mean prompt length (0: keep raw)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--store-dtype", choices=sorted(cap.STORE_DTYPES), default="float16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=256, help="max batch size of the project method")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the detected dense bf16 peak")
    parser.add_argument("--no-writes", action="store_true", help="skip the overlapped store-write measurement")
    parser.add_argument("--shard-rows", type=int, default=None, help="rows per store shard (default: the store's)")
    parser.add_argument("--store", type=Path, default=None, help="folder for the write measurement (default tmp)")
    parser.add_argument("--engine", choices=["single", "pipeline"], default="single", help="replica engine")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (with --engine pipeline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)

    t_build, model = timed(lambda: build_model(args.shape, device, dtype), device)
    n_params = non_embedding_params(model)
    lengths, source = dataset_lengths(args.prompts, args.tokens or None, args.seed)
    token_ids = synthetic_prompts(lengths, model.config.vocab_size, args.seed)
    ref_ids = token_ids[: min(args.reference_prompts, len(token_ids))]
    n_tokens, ref_tokens = sum(lengths), sum(len(t) for t in ref_ids)
    peak, peak_text = peak_tflops(device, args.peak_tflops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    print(
        f"shape {args.shape}: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
        f"intermediate {model.config.intermediate_size}, {n_params / 1e9:.3f}B non-embedding params, {args.dtype} "
        f"on {device_name} (built in {t_build:.1f}s); attention {model.config._attn_implementation}"
    )
    print(f"prompts: {source}")
    print(
        f"project: {len(token_ids)} prompts, {n_tokens} tokens (mean {n_tokens / len(token_ids):.1f}, "
        f"max {max(lengths)}); token budget {args.token_budget}, max batch {args.batch}, "
        f"store dtype {args.store_dtype}; reference: {len(ref_ids)} prompts, {ref_tokens} tokens"
    )
    print(f"peak: {peak_text}")

    limits = Limits(args.token_budget, args.batch)
    with contextlib.closing(make_backend(model, args.engine, args.stages)) as backend:

        def project(ids: list[list[int]]) -> np.ndarray:
            parts, _ = backend.capture_parts(ids, args.store_dtype, limits)
            return np.concatenate([rows for _, _, rows in parts], axis=1)

        warm = token_ids[: min(len(token_ids), 2 * args.batch)]
        timed(lambda: project(warm), device)  # kernels, allocator pools, pinned slots
        timed(lambda: reference(model, ref_ids[:4], device), device)
        times: dict[str, list[float]] = {"project": [], "reference": []}
        proj_out = ref_out = None
        for _ in range(args.repeats):
            dt, proj_out = timed(lambda: project(token_ids), device)
            times["project"].append(dt)
            dt, ref_out = timed(lambda: reference(model, ref_ids, device), device)
            times["reference"].append(dt)

        scale = float(np.abs(ref_out).max()) or 1.0
        rel_diff = float(np.abs(proj_out[: len(ref_ids)].astype(np.float32) - ref_out).max()) / scale

        figures: dict[str, Any] = {
            "shape": args.shape,
            "engine": args.engine if args.engine == "single" else f"pipeline ({args.stages} stages on one device)",
            "device": device_name,
            "dtype": args.dtype,
            "non_embedding_params": n_params,
            "prompts_source": source,
            "peak_tflops": peak,
            "repeats": args.repeats,
            "rel_max_abs_diff": rel_diff,
        }
        print(f"{'method':<10} {'median s':>9} {'prompts/s':>10} {'tokens/s':>10} {'MFU':>7}   runs (s)")
        for name, ts in times.items():
            n_p, n_t = (len(token_ids), n_tokens) if name == "project" else (len(ref_ids), ref_tokens)
            med = statistics.median(ts)
            mfu = 2 * n_params * n_t / med / (peak * 1e12) if peak else None
            figures[name] = {
                "prompts": n_p,
                "tokens": n_t,
                "seconds": ts,
                "median_s": med,
                "prompts_per_s": n_p / med,
                "tokens_per_s": n_t / med,
                "mfu": mfu,
            }
            mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
            print(
                f"{name:<10} {med:>9.3f} {n_p / med:>10.1f} {n_t / med:>10.0f} {mfu_text:>7}   "
                + " ".join(f"{t:.2f}" for t in ts)
            )
        ratio = figures["project"]["prompts_per_s"] / figures["reference"]["prompts_per_s"]
        figures["ratio"] = ratio
        print(f"agreement: max |project({args.store_dtype}) - reference| / max |act| = {rel_diff:.2e}")

        writes = None
        if not args.no_writes:
            with tempfile.TemporaryDirectory(dir=args.store) as tmp:
                writes = measure_writes(backend, token_ids, args, Path(tmp) / "store")
            figures["writes"] = writes
            print(
                f"writes: {writes['shards']} shards of {writes['shard_rows']} rows, {writes['store_mb']:.0f} MB "
                f"to a local Zarr store; wall {writes['wall_s']:.2f}s ({writes['prompts_per_s']:.1f} prompts/s), "
                f"compute {writes['compute_s']:.2f}s, writes {writes['write_s']:.2f}s beside it, "
                f"GPU idle caused by writes {writes['idle_s']:.2f}s ({100 * writes['idle_fraction']:.1f}% of wall); "
                f"compute-then-write would take {writes['serial_estimate_s']:.2f}s"
            )

    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    p, r = figures["project"], figures["reference"]

    def mfu_of(x: dict) -> str:
        return f"{100 * x['mfu']:.1f}%" if x["mfu"] is not None else "n/a"

    print("== summary ==")
    print(
        f"shape: {args.shape} on {device_name}, {args.dtype}, engine {figures['engine']}, "
        f"mean prompt {n_tokens / len(token_ids):.1f} tokens"
    )
    print(f"project:   {p['prompts_per_s']:.1f} prompts/s, {p['tokens_per_s']:.0f} tokens/s, MFU {mfu_of(p)}")
    print(f"reference: {r['prompts_per_s']:.1f} prompts/s, {r['tokens_per_s']:.0f} tokens/s, MFU {mfu_of(r)}")
    print(f"ratio (project / reference prompts/s): {ratio:.2f}x")
    if writes is not None:
        print(
            f"write overlap: GPU idle {writes['idle_s']:.2f}s of {writes['wall_s']:.2f}s "
            f"({100 * writes['idle_fraction']:.1f}%)"
        )


if __name__ == "__main__":
    main()
