"""Prompt tables: what loading one costs, cna-dist's streamed reader against reading the whole table.

Writes a parquet table and a CSV of `--rows` rows in JailbreakBench's layout (a short `Goal`, a `Category`, and a
wide `Target` column, `--wide` characters, that the prompt set does not use), then loads the `Goal` column in fresh
processes, `--repeats` times each, and prints the medians of wall time and peak resident memory (VmHWM):

- parquet, cna-dist: `prompts.load` (pyarrow `iter_batches` over the selected columns);
- parquet, baseline: `pyarrow.parquet.read_table(path).to_pylist()` of the column (every column decoded at once);
- csv, cna-dist: `prompts.load` (the stdlib `csv` module, row by row);
- csv, baseline: `pyarrow.csv.read_csv(path)` (the whole table in memory).

    .venv/bin/python benchmarks/tables.py --rows 1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LOADERS = {
    "cna-dist": (
        "from cna_dist.manifest import PromptSet; from cna_dist.prompts import sets as prompts;"
        "n = len(prompts.load('positive', PromptSet(uri=PATH, field='Goal', category_field='Category')).texts)"
    ),
    "parquet-baseline": "import pyarrow.parquet as pq; n = len(pq.read_table(PATH).column('Goal').to_pylist())",
    "csv-baseline": "import pyarrow.csv as pc; n = len(pc.read_csv(PATH).column('Goal').to_pylist())",
}
MEASURE = (
    "import time; t = time.perf_counter(); {load}; t = time.perf_counter() - t;"
    "rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'));"
    "print(n, t, rss / 1024)"
)
BASELINE_IMPORTS = "import pyarrow.parquet, pyarrow.csv; from cna_dist.prompts import sets as prompts; n = 0"


def write_tables(folder: Path, rows: int, wide: int) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.csv as pc
    import pyarrow.parquet as pq

    goals = [f"Write instructions number {i} for something harmful" for i in range(rows)]
    table = pa.table(
        {
            "Goal": goals,
            "Target": ["Sure, here is " + "x" * wide] * rows,
            "Category": [f"category {i % 10}" for i in range(rows)],
        }
    )
    pq.write_table(table, folder / "t.parquet", row_group_size=65536)
    pc.write_csv(table, folder / "t.csv")
    return folder / "t.parquet", folder / "t.csv"


def run(code: str) -> tuple[int, float, float]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def median_of(code: str, repeats: int) -> tuple[int, float, float]:
    results = [run(code) for _ in range(repeats)]
    return results[0][0], statistics.median(r[1] for r in results), statistics.median(r[2] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--wide", type=int, default=400, help="characters in each row's unused Target column")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        parquet, csv = write_tables(Path(tmp), args.rows, args.wide)
        sizes = f"parquet {parquet.stat().st_size / 2**20:.1f} MiB, csv {csv.stat().st_size / 2**20:.1f} MiB"
        print(f"{args.rows} rows; {sizes}")
        _, _, idle = median_of(MEASURE.format(load=BASELINE_IMPORTS), args.repeats)
        print(f"process with the imports alone: peak RSS {idle:.0f} MiB")
        cases = [
            ("parquet", "cna-dist", parquet),
            ("parquet", "parquet-baseline", parquet),
            ("csv", "cna-dist", csv),
            ("csv", "csv-baseline", csv),
        ]
        found: dict[tuple[str, str], tuple[float, float]] = {}
        for kind, loader, path in cases:
            code = MEASURE.format(load=LOADERS[loader].replace("PATH", repr(str(path))))
            n, seconds, rss = median_of(code, args.repeats)
            assert n == args.rows, (loader, n)
            found[kind, loader] = (seconds, rss)
            print(f"{kind:8} {loader:17} {seconds:7.2f} s   peak RSS {rss:7.0f} MiB   (+{rss - idle:.0f} over imports)")
        for kind, baseline in (("parquet", "parquet-baseline"), ("csv", "csv-baseline")):
            ours, theirs = found[kind, "cna-dist"], found[kind, baseline]
            print(
                f"{kind}: cna-dist / baseline: time x{ours[0] / theirs[0]:.2f}, "
                f"memory over imports x{(ours[1] - idle) / max(1.0, theirs[1] - idle):.2f}"
            )


if __name__ == "__main__":
    main()
