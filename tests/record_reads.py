"""Run the cna-dist CLI with every s3fs read of this process recorded, to show what the driver fetches.

    python -m tests.record_reads OUT.json mine MANIFEST ...

OUT.json gets a list of [path, bytes] for each read of an object's bytes (whole-object reads, downloads and
ranged reads of opened files), written at exit whatever the exit status.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from typing import Any

import s3fs
import s3fs.core


def _record(reads: list[list[Any]]) -> None:
    cat, get, fetch = s3fs.S3FileSystem._cat_file, s3fs.S3FileSystem._get_file, s3fs.core.S3File._fetch_range

    async def cat_file(self: Any, path: str, *args: Any, **kwargs: Any) -> bytes:
        data = await cat(self, path, *args, **kwargs)
        reads.append([str(path), len(data)])
        return data

    async def get_file(self: Any, rpath: str, lpath: str, *args: Any, **kwargs: Any) -> Any:
        out = await get(self, rpath, lpath, *args, **kwargs)
        reads.append([str(rpath), os.path.getsize(lpath)])
        return out

    def fetch_range(self: Any, start: int, end: int) -> bytes:
        data = fetch(self, start, end)
        reads.append([str(self.path), len(data)])
        return data

    s3fs.S3FileSystem._cat_file = cat_file
    s3fs.S3FileSystem._get_file = get_file
    s3fs.core.S3File._fetch_range = fetch_range


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    reads: list[list[Any]] = []
    _record(reads)
    atexit.register(lambda: open(out, "w").write(json.dumps(reads)))
    from cna_dist.cli import main as cli

    sys.argv = ["cna-dist", *args]
    cli()


if __name__ == "__main__":
    main()
