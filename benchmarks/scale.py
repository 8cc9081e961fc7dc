"""Benchmark: what capture, the store, the reduce and the driver cost as the prompts grow, at the real 72B row size.

Why: the product exists for 72B models, where one prompt's row is 4.7 MB (80 layers x 29568 neurons, float16). This
script mines a model of exactly that row shape and a tiny hidden size (cna_dist/demo/scale.py) for N prompts, each N
in a fresh store, with `cna-dist mine` in its own process (a local Ray, one replica), on local disk and on S3 (moto
on 127.0.0.1 behind a counting proxy), and reports for each N:

* capture-write throughput: activation bytes written / the replicas' write seconds (data and markers), and bytes
  / the capture wall time (forward passes included);
* reduce throughput: store bytes / the reduce's wall time (Ray tasks, one CPU each);
* driver peak memory: the `mine` process's VmHWM (the driver; replicas and tasks are other processes);
* per-task peak memory: the reduce run again over the same store with every task in a fresh process
  (benchmarks/reduce.py's measuring mapper), the largest RSS increase over the tasks of each step;
* store objects and bytes under the run; S3 requests per captured shard (every request of the mine process and its
  Ray workers, through the proxy).

It prints a table, draws each figure against N (PNG) and says how each grows between the smallest and largest N:
store bytes and reduce time should grow linearly, driver and per-task memory stay flat.

Run from the repository root (the default takes about half an hour on 2 cores and 20 GB of disk):

    .venv/bin/python benchmarks/scale.py [--n 250,500,1000,2000] [--s3-n 250,500] [--png docs/scale.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from reduce import SubprocessMapper  # noqa: E402

from cna_dist.demo.scale import save_moe_scale_model, save_scale_model, scale_prompts  # noqa: E402
from cna_dist.store import uri as urimod  # noqa: E402
from cna_dist.store.activations import ActivationStore  # noqa: E402

MB = 1e6


@dataclass
class Row:
    where: str
    n: int
    shards: int
    capture_s: float
    write_mb_s: float
    capture_mb_s: float
    reduce_s: float
    reduce_mb_s: float
    driver_mib: float
    task_mib: float
    objects: int
    store_mb: float
    requests_per_shard: float | None


# -- S3: moto behind a counting proxy ----------------------------------------------------------------------------
class S3:
    """moto's server and a proxy counting every request made through it, both on 127.0.0.1."""

    def __init__(self) -> None:
        from tests.conftest import free_port
        from tests.s3proxy import ForwardingHandler, ProxyState

        port = free_port()
        self.moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.requests = 0
        bench = self

        class Counting(ForwardingHandler):
            def _forward(self) -> None:
                bench.requests += 1
                super()._forward()

        from http.server import ThreadingHTTPServer

        Counting.state = ProxyState(("127.0.0.1", port), mode="pass")
        self.proxy = ThreadingHTTPServer(("127.0.0.1", free_port()), Counting)
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.env = {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{self.proxy.server_address[1]}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        os.environ.update(self.env)
        for _ in range(100):
            try:
                import boto3

                boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="cna")
                break
            except Exception:  # noqa: BLE001 - moto still starting
                time.sleep(0.1)

    def close(self) -> None:
        self.proxy.shutdown()
        self.moto.terminate()
        self.moto.wait(timeout=10)


# -- one N ------------------------------------------------------------------------------------------------------
# a MoE row is 37 MB (Qwen3-235B-A22B's 18.5M neurons): small batches and shards keep a replica's buffers in bounds
CAPTURE = {
    "qwen2": {"dtype": "float16"},
    "llama": {"dtype": "float16"},
    "qwen3_moe": {"dtype": "float16", "max_batch_size": 4, "shard_rows": 16},
}
ARCH = "qwen2"


def write_manifest(folder: Path, model: str, out: str, n: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sets = scale_prompts(n, seed)
    for name, texts in sets.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    manifest = {
        "name": f"scale-{n}",
        "model": {"uri": model, "dtype": "float32"},
        "prompts": {name: {"uri": f"./{name}.jsonl"} for name in sets},
        "select": {"top_fraction": 0.001, "exclude_layers": [0, 1]},
        "universal": {"top_fraction": 0.001, "threshold": 0.8, "scope": "global"},
        "capture": CAPTURE[ARCH],
        "output": {"store": f"{out}/store", "registry": f"{out}/circuits"},
    }
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def mine(manifest: Path, cache: Path) -> dict[str, Any]:
    summary = manifest.with_name("summary.json")
    cli = Path(sys.executable).with_name("cna-dist")
    env = {**os.environ, "CNA_DIST_CACHE": str(cache)}
    done = subprocess.run(
        [str(cli), "mine", str(manifest), "--summary", str(summary), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"mine failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(summary.read_text())


def task_peak_mib(store_uri: str, run_id: str, manifest: Path) -> float:
    """The reduce again, as `mine` runs it but every task in a fresh process: the largest task's peak RSS increase."""
    from cna_dist import manifest as manifestmod
    from cna_dist.commands.mine import prepare, reduce
    from cna_dist.validate import validate

    m = manifestmod.load(manifest)
    prepared = prepare(m, validate(m, check_remote=True))
    store = ActivationStore(store_uri)
    mapper = SubprocessMapper(workers=2)
    reduce(m, prepared, store.open_run(store.load_meta(run_id), create=False), SimpleNamespace(map=mapper))
    return max(s["rss"] for s in mapper.stats) / (1 << 20)


def store_size(store_uri: str, run_id: str) -> tuple[int, int]:
    fs, path = urimod.filesystem(urimod.join(store_uri, "runs", run_id))
    found = fs.find(path, detail=True)
    return len(found), sum(int(e.get("size") or 0) for e in found.values())


def measure(where: str, n: int, model: str, out: str, work: Path, s3: S3 | None, seed: int) -> Row:
    manifest = write_manifest(work / f"{where}-{n}", model, out, n, seed)
    before = s3.requests if s3 else 0
    s = mine(manifest, work / "cache")
    requests = (s3.requests - before) if s3 else 0
    objects, nbytes = store_size(f"{out}/store", s["run"])
    task = task_peak_mib(f"{out}/store", s["run"], manifest)
    t = s["timings_s"]
    row = Row(
        where=where,
        n=n,
        shards=s["shards_captured"],
        capture_s=t["capture"],
        write_mb_s=s["written_bytes"] / MB / max(s["write_seconds"], 1e-9),
        capture_mb_s=s["written_bytes"] / MB / t["capture"],
        reduce_s=t["reduce"],
        reduce_mb_s=nbytes / MB / t["reduce"],
        driver_mib=s["driver_peak_mib"],
        task_mib=task,
        objects=objects,
        store_mb=nbytes / MB,
        requests_per_shard=requests / s["shards_captured"] if s3 else None,
    )
    print(table_line(row), flush=True)
    return row


# -- report -----------------------------------------------------------------------------------------------------
HEADER = (
    f"{'where':<6}{'N':>6}{'shards':>7}{'capture s':>10}{'write MB/s':>11}{'capt MB/s':>10}{'reduce s':>9}"
    f"{'red MB/s':>9}{'driver MiB':>11}{'task MiB':>9}{'objects':>8}{'store MB':>9}{'req/shard':>10}"
)


def table_line(r: Row) -> str:
    req = f"{r.requests_per_shard:.0f}" if r.requests_per_shard is not None else "-"
    return (
        f"{r.where:<6}{r.n:>6}{r.shards:>7}{r.capture_s:>10.1f}{r.write_mb_s:>11.0f}{r.capture_mb_s:>10.0f}"
        f"{r.reduce_s:>9.1f}{r.reduce_mb_s:>9.0f}{r.driver_mib:>11.0f}{r.task_mib:>9.0f}{r.objects:>8}"
        f"{r.store_mb:>9.0f}{req:>10}"
    )


def growth(rows: list[Row]) -> list[str]:
    """How each figure grows from the smallest to the largest N, per place: x N-ratio means linear, x1 flat."""
    lines = []
    for where in dict.fromkeys(r.where for r in rows):
        mine_rows = sorted((r for r in rows if r.where == where), key=lambda r: r.n)
        if len(mine_rows) < 2:
            continue
        a, b = mine_rows[0], mine_rows[-1]
        lines.append(
            f"{where}: N x{b.n / a.n:.1f} -> store bytes x{b.store_mb / a.store_mb:.2f}, reduce time "
            f"x{b.reduce_s / a.reduce_s:.2f}, capture time x{b.capture_s / a.capture_s:.2f}, driver peak "
            f"x{b.driver_mib / a.driver_mib:.2f}, task peak x{b.task_mib / a.task_mib:.2f}"
        )
    return lines


def plot(rows: list[Row], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [
        ("store_mb", "store size (MB)"),
        ("reduce_s", "reduce time (s)"),
        ("capture_s", "capture time (s)"),
        ("write_mb_s", "capture write throughput (MB/s)"),
        ("reduce_mb_s", "reduce throughput (MB/s)"),
        ("driver_mib", "driver peak RSS (MiB)"),
        ("task_mib", "reduce task peak RSS increase (MiB)"),
        ("requests_per_shard", "S3 requests per shard"),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, title) in zip(axes.flat, figures, strict=True):
        for where in dict.fromkeys(r.where for r in rows):
            pts = [(r.n, getattr(r, key)) for r in rows if r.where == where and getattr(r, key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=where)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("prompts N")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle("cna-dist at the 72B row size (80 x 29568 float16, 4.7 MB per prompt), one replica, 2 CPUs")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="250,500,1000,2000", help="prompt counts on local disk (comma-separated)")
    p.add_argument("--s3-n", default="250,500", help="prompt counts on S3 (moto keeps objects in memory)")
    p.add_argument("--arch", choices=sorted(CAPTURE), default="qwen2", help="row shape: 72B dense or 235B MoE")
    p.add_argument("--png", type=Path, default=None, help="where to draw the figures (default: no PNG)")
    p.add_argument("--json", type=Path, default=None, help="where to write the rows as JSON")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.n = [int(x) for x in args.n.split(",") if x]
        args.s3_n = [int(x) for x in args.s3_n.split(",") if x]
    except ValueError:
        p.error("--n and --s3-n take comma-separated integers")
    if any(n < 3 for n in args.n + args.s3_n):
        p.error("every N must be at least 3 (one prompt per set)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cna-bench-scale-") as tmp:
        work = args.work or Path(tmp)
        return bench(args, work)


def bench(args: argparse.Namespace, work: Path) -> int:
    global ARCH
    ARCH = args.arch
    if args.arch == "qwen3_moe":
        model = save_moe_scale_model(work / "model", seed=args.seed)
    else:
        model = save_scale_model(work / "model", args.arch, seed=args.seed)
    print(f"model: {args.arch} shape, {sum(f.stat().st_size for f in model.iterdir()) / MB:.0f} MB on disk")
    print(HEADER, flush=True)
    rows = [measure("local", n, str(model), str(work / f"out-{n}"), work, None, args.seed) for n in args.n]
    if args.s3_n:
        s3 = S3()
        try:
            fs, _ = urimod.filesystem("s3://cna")
            fs.put(str(model), "cna/model", recursive=True)
            for n in args.s3_n:
                rows.append(measure("s3", n, "s3://cna/model", f"s3://cna/out-{n}", work, s3, args.seed))
                fs.rm(f"cna/out-{n}", recursive=True)  # moto holds objects in memory
        finally:
            s3.close()
    print("\n--- summary ---")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/scale.py", *sys.argv[1:]])
    print(f"command: {command}")
    print(HEADER)
    for r in rows:
        print(table_line(r))
    for line in growth(rows):
        print(line)
    print(f"median driver peak {statistics.median(r.driver_mib for r in rows):.0f} MiB over {len(rows)} runs")
    if args.png:
        plot(rows, args.png)
        print(f"figures: {args.png}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
