"""Ranged, parallel, resumable copies (cna_dist.store.download) from moto's S3 server over HTTP, and from a local
filesystem in a process that is killed mid-copy: ranges in flight at once, bytes reassembled exactly, a resumed copy
fetching only what is missing, a changed file fetched whole, short reads and changes during a copy refused."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cna_dist.errors import BadInput, RunFailure
from cna_dist.store import download
from cna_dist.store import uri as urimod

PART = 64 << 10


class Recording:
    """An fsspec filesystem seen through `cat_file`: every range fetched, how many at once, and a hook to inject
    a wait, a failure or a change before a range is fetched (`hook(path, start, end)`)."""

    def __init__(self, fs: Any, hook: Callable[[str, int, int], None] | None = None):
        self.fs, self.hook = fs, hook
        self.ranges: list[tuple[str, int, int]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)

    def cat_file(self, path: str, start: int, end: int) -> bytes:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hook:
                self.hook(path, start, end)
            data = self.fs.cat_file(path, start=start, end=end)
            with self.lock:
                self.ranges.append((Path(path).name, start, end))
            return data
        finally:
            with self.lock:
                self.in_flight -= 1

    def fetched(self) -> int:
        return sum(end - start for _, start, end in self.ranges)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(files: dict[str, bytes]) -> tuple[Any, list[download.Remote]]:
    uri = f"s3://cna/{uuid.uuid4().hex}"
    fs, path = urimod.filesystem(uri)
    for name, data in files.items():
        fs.pipe_file(f"{path}/{name}", data)
    return fs, listing(fs, path)


def listing(fs: Any, path: str) -> list[download.Remote]:
    fs.invalidate_cache(path)
    return [download.remote(e) for e in sorted(fs.ls(path, detail=True), key=lambda e: e["name"])]


def fail_at(offset: int) -> Callable[[str, int, int], None]:
    def hook(path: str, start: int, end: int) -> None:
        if start == offset and path.endswith("weights.bin"):
            raise OSError("connection reset (injected)")

    return hook


def record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / download.RECORD).read_text())


# --- settings --------------------------------------------------------------------------------------------------


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert download.Settings.from_env() == download.Settings(16, 32 << 20)
    monkeypatch.setenv(download.CONCURRENCY_ENV, "4")
    monkeypatch.setenv(download.PART_SIZE_ENV, "8m")
    assert download.Settings.from_env() == download.Settings(4, 8 << 20)
    monkeypatch.setenv(download.PART_SIZE_ENV, "4096")
    assert download.Settings.from_env().part_size == 4096
    monkeypatch.setenv(download.PART_SIZE_ENV, "2 GiB")
    assert download.Settings.from_env().part_size == 2 << 30


@pytest.mark.parametrize(
    "name,value,message",
    [
        (download.CONCURRENCY_ENV, "0", "'0' is not a positive integer"),
        (download.CONCURRENCY_ENV, "many", "'many' is not a positive integer"),
        (download.PART_SIZE_ENV, "64 pages", "'64 pages' is not a positive size in bytes (or with a k/m/g suffix)"),
        (download.PART_SIZE_ENV, "-1m", "'-1m' is not a positive size"),
    ],
)
def test_settings_refuse_bad_values(name: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(BadInput) as info:
        download.Settings.from_env()
    assert info.value.field == name and f"environment: {name}: {name} = {message}" in str(info.value)


# --- copies from S3 --------------------------------------------------------------------------------------------


def test_parts_are_fetched_concurrently_and_reassembled_bit_identical(tmp_path: Path, s3_server: str) -> None:
    data = os.urandom(20 * PART + 123)
    fs, files = put({"weights.bin": data, "config.json": b'{"a": 1}', "empty.txt": b""})
    barrier = threading.Barrier(4, timeout=10)  # breaks (and fails the copy) unless 4 GETs are in flight at once
    arrived = []

    def together(path: str, start: int, end: int) -> None:
        with barrier_lock:
            arrived.append(start)
            waits = len(arrived) <= 4
        if waits:
            barrier.wait()

    barrier_lock = threading.Lock()
    seen = Recording(fs, together)
    stats = download.copy(seen, files, tmp_path / "c", key="k", settings=download.Settings(4, PART))

    assert seen.max_in_flight == 4
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["config.json", "empty.txt", "weights.bin"]
    assert sha((tmp_path / "c" / "weights.bin").read_bytes()) == sha(data)
    assert (tmp_path / "c" / "config.json").read_bytes() == b'{"a": 1}' and (
        tmp_path / "c" / "empty.txt"
    ).stat().st_size == 0
    weight_ranges = sorted((s, e) for n, s, e in seen.ranges if n == "weights.bin")
    assert weight_ranges == [(s, min(s + PART, len(data))) for s in range(0, len(data), PART)]  # 21 GETs, no overlap
    assert [(n, s, e) for n, s, e in seen.ranges if n != "weights.bin"] == [("config.json", 0, 8)]  # empty: no GET
    assert (stats.files, stats.total, stats.fetched, stats.resumed) == (3, len(data) + 8, len(data) + 8, 0)
    assert not (tmp_path / "c" / download.RECORD).exists()
    assert re.fullmatch(r"3 files, 1\.3 MiB in [0-9]+\.[0-9] s \([0-9]+ MB/s\), resumed 0 B", stats.describe())


def test_a_failed_range_keeps_the_finished_parts_and_the_next_call_fetches_only_the_rest(
    tmp_path: Path, s3_server: str
) -> None:
    data = os.urandom(16 * PART)
    fs, files = put({"weights.bin": data, "config.json": b"{}"})
    folder, one = tmp_path / "c", download.Settings(1, PART)
    broken = Recording(fs, fail_at(5 * PART))
    with pytest.raises(RunFailure) as info:
        download.copy(broken, files, folder, key="k", settings=one)
    assert f"{files[1].path}: fetching bytes {5 * PART}-{6 * PART} of {16 * PART} failed: connection reset" in str(
        info.value
    )
    assert record(folder)["files"]["weights.bin"]["done"] == [[0, 5 * PART]]

    again = Recording(fs)
    stats = download.copy(again, files, folder, key="k", settings=one)
    assert again.fetched() == 11 * PART and min(s for n, s, _ in again.ranges if n == "weights.bin") == 5 * PART
    assert ("config.json", 0, 2) not in again.ranges  # fetched by the first call (files in order) and kept
    assert (stats.resumed, stats.fetched) == (5 * PART + 2, 11 * PART)
    assert sha((folder / "weights.bin").read_bytes()) == sha(data)


def test_a_resumed_copy_with_many_in_flight_fetches_exactly_the_unrecorded_ranges(
    tmp_path: Path, s3_server: str
) -> None:
    data = os.urandom(40 * PART)
    fs, files = put({"weights.bin": data})
    folder, four = tmp_path / "c", download.Settings(4, PART)
    with pytest.raises(RunFailure):
        download.copy(Recording(fs, fail_at(17 * PART)), files, folder, key="k", settings=four)
    done = record(folder)["files"]["weights.bin"]["done"]
    kept = sum(e - s for s, e in done)
    assert 0 < kept < len(data)

    again = Recording(fs)
    download.copy(again, files, folder, key="k", settings=four)
    assert again.fetched() == len(data) - kept
    assert not [r for r in again.ranges for s, e in done if r[1] < e and s < r[2]]  # nothing fetched twice
    assert sha((folder / "weights.bin").read_bytes()) == sha(data)


def test_a_file_changed_between_attempts_is_fetched_whole_and_not_mixed(tmp_path: Path, s3_server: str) -> None:
    old, new = os.urandom(8 * PART), os.urandom(8 * PART)  # same size: only the ETag tells them apart
    fs, files = put({"weights.bin": old})
    folder, one = tmp_path / "c", download.Settings(1, PART)
    with pytest.raises(RunFailure):
        download.copy(Recording(fs, fail_at(4 * PART)), files, folder, key="k", settings=one)
    assert record(folder)["files"]["weights.bin"]["done"] == [[0, 4 * PART]]

    fs.pipe_file(files[0].path, new)
    changed = listing(fs, files[0].path.rsplit("/", 1)[0])
    assert changed[0].identity != files[0].identity and changed[0].size == files[0].size
    again = Recording(fs)
    stats = download.copy(again, changed, folder, key="k", settings=one)
    assert again.fetched() == len(new) and stats.resumed == 0
    assert sha((folder / "weights.bin").read_bytes()) == sha(new)


def test_another_key_discards_the_whole_partial_copy(tmp_path: Path, s3_server: str) -> None:
    data = os.urandom(8 * PART)
    fs, files = put({"weights.bin": data})
    folder = tmp_path / "c"
    with pytest.raises(RunFailure):
        download.copy(Recording(fs, fail_at(4 * PART)), files, folder, key="old", settings=download.Settings(1, PART))
    (folder / "junk").write_text("not ours")
    again = Recording(fs)
    download.copy(again, files, folder, key="new", settings=download.Settings(2, PART))
    assert again.fetched() == len(data) and sorted(p.name for p in folder.iterdir()) == ["weights.bin"]
    assert sha((folder / "weights.bin").read_bytes()) == sha(data)


@pytest.mark.parametrize(
    "done", [[[0, 9 * PART]], [[0, "4"]], [[2 * PART, PART]], "all", [[0, PART, 2 * PART]], None], ids=repr
)
def test_a_record_entry_that_does_not_fit_the_file_is_ignored(done: Any, tmp_path: Path, s3_server: str) -> None:
    data = os.urandom(8 * PART)
    fs, files = put({"weights.bin": data})
    folder = tmp_path / "c"
    with pytest.raises(RunFailure):
        download.copy(Recording(fs, fail_at(4 * PART)), files, folder, key="k", settings=download.Settings(1, PART))
    kept = record(folder)
    kept["files"]["weights.bin"]["done"] = done
    (folder / download.RECORD).write_text(json.dumps(kept))
    again = Recording(fs)
    stats = download.copy(again, files, folder, key="k", settings=download.Settings(2, PART))
    assert again.fetched() == len(data) and stats.resumed == 0
    assert sha((folder / "weights.bin").read_bytes()) == sha(data)


def test_an_unreadable_record_starts_over(tmp_path: Path, s3_server: str) -> None:
    data = os.urandom(8 * PART)
    fs, files = put({"weights.bin": data})
    folder = tmp_path / "c"
    with pytest.raises(RunFailure):
        download.copy(Recording(fs, fail_at(4 * PART)), files, folder, key="k", settings=download.Settings(1, PART))
    (folder / download.RECORD).write_text('{"key": "k", "files": {"weights.bin": ')  # torn by hand
    again = Recording(fs)
    download.copy(again, files, folder, key="k", settings=download.Settings(2, PART))
    assert again.fetched() == len(data) and sha((folder / "weights.bin").read_bytes()) == sha(data)


def test_a_file_changed_during_the_copy_is_an_error_and_loses_its_parts(tmp_path: Path, s3_server: str) -> None:
    old, new = os.urandom(8 * PART), os.urandom(8 * PART)
    fs, files = put({"weights.bin": old})
    folder = tmp_path / "c"

    def overwrite(path: str, start: int, end: int) -> None:
        if start == 4 * PART:
            fs.pipe_file(path, new)  # the second half of the copy comes from the new bytes

    with pytest.raises(RunFailure) as info:
        download.copy(Recording(fs, overwrite), files, folder, key="k", settings=download.Settings(1, PART))
    assert f"{files[0].path} changed while it was copied" in str(info.value) and "parts are discarded" in str(
        info.value
    )
    assert "weights.bin" not in record(folder)["files"]
    changed = listing(fs, files[0].path.rsplit("/", 1)[0])
    again = Recording(fs)
    download.copy(again, changed, folder, key="k", settings=download.Settings(1, PART))
    assert again.fetched() == len(new) and sha((folder / "weights.bin").read_bytes()) == sha(new)


def test_a_short_read_is_an_error_naming_the_file_and_range(tmp_path: Path, s3_server: str) -> None:
    fs, files = put({"weights.bin": os.urandom(4 * PART)})

    class Short(Recording):
        def cat_file(self, path: str, start: int, end: int) -> bytes:
            data = super().cat_file(path, start, end)
            return data[:-1] if start == 2 * PART else data

    with pytest.raises(RunFailure) as info:
        download.copy(Short(fs), files, tmp_path / "c", key="k", settings=download.Settings(1, PART))
    assert str(info.value).startswith(f"{files[0].path}: fetching bytes {2 * PART}-{3 * PART} of {4 * PART} failed")
    assert f"got {PART - 1} bytes for a {PART}-byte range" in str(info.value)
    assert record(tmp_path / "c")["files"]["weights.bin"]["done"] == [[0, 2 * PART]]


def test_not_enough_disk_space_is_refused_before_any_fetch(
    tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    fs, files = put({"weights.bin": os.urandom(4 * PART)})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    seen = Recording(fs)
    with pytest.raises(RunFailure, match=r"not enough disk space for the copy: 0.00 GiB needed, 0.00 GiB free"):
        download.copy(seen, files, tmp_path / "c", key="k")
    assert seen.ranges == [] and not (tmp_path / "c" / "weights.bin").exists()


# --- a killed process ------------------------------------------------------------------------------------------

KILLED_COPY = """
import sys, time
from pathlib import Path
import fsspec
from cna_dist.store import download

download.FLUSH_SECONDS = 0.05
fs = fsspec.filesystem("file")
real = fs.cat_file
def slow(path, start=None, end=None):
    time.sleep(0.02)
    return real(path, start=start, end=end)
fs.cat_file = slow
files = [download.remote(fs.info(sys.argv[1]))]
download.copy(fs, files, Path(sys.argv[2]), key="k", settings=download.Settings(2, 4096))
"""


def test_a_killed_copy_resumes_from_its_record(tmp_path: Path) -> None:
    """A real process killed with SIGKILL mid-copy (local filesystem: the copy is storage-generic)."""
    import fsspec

    data = os.urandom(400 * 4096)
    source = tmp_path / "weights.bin"
    source.write_bytes(data)
    folder = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_COPY, str(source), str(folder)])
    try:
        deadline = time.monotonic() + 30
        while not (folder / download.RECORD).exists() or not record(folder)["files"]["weights.bin"]["done"]:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    done = record(folder)["files"]["weights.bin"]["done"]
    kept = sum(e - s for s, e in done)
    assert 0 < kept < len(data)

    fs = fsspec.filesystem("file")
    again = Recording(fs)
    stats = download.copy(again, [download.remote(fs.info(str(source)))], folder, key="k")
    assert again.fetched() == len(data) - kept == stats.fetched and stats.resumed == kept
    assert sha((folder / "weights.bin").read_bytes()) == sha(data) and not (folder / download.RECORD).exists()
