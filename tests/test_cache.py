"""The bounded model cache: least recently used complete copies evicted beyond CNA_DIST_CACHE_MAX_BYTES, never one
another process holds or is copying; stale partial copies removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cna_dist.errors import BadInput
from cna_dist.model import cache

HOLD = """
import fcntl, sys
from filelock import FileLock
kind, path = sys.argv[1], sys.argv[2]
if kind == "use":
    handle = open(path, "ab")
    fcntl.flock(handle, fcntl.LOCK_SH)
else:
    lock = FileLock(path)
    lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


class Holder:
    """Another process holding a copy's use lock (a live replica) or its copy lock (a copy in progress)."""

    def __init__(self, kind: str, path: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, kind, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def make_copy(root: Path, fp: str, nbytes: int, used: float | None = None, complete: bool = True) -> Path:
    folder = root / fp
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * nbytes)
    if complete:
        (folder / ".complete").write_text(fp)
    if used is not None:
        use = root / f"{fp}.use"
        use.touch()
        os.utime(use, (used, used))
    return folder


@pytest.mark.parametrize(
    "text,size", [("", None), ("1000", 1000), ("500G", 500 << 30), ("1.5M", 3 << 19), ("2TiB", 2 << 40), ("0", 0)]
)
def test_sizes(text: str, size: int | None) -> None:
    assert cache.max_bytes(text) == size


@pytest.mark.parametrize("text", ["lots", "-5G", "12Q", "nan"])
def test_a_bad_size_is_bad_input_naming_the_variable(text: str) -> None:
    with pytest.raises(BadInput) as info:
        cache.max_bytes(text)
    assert info.value.field == "CNA_DIST_CACHE_MAX_BYTES"


def test_least_recently_used_first_never_one_held_or_being_copied(tmp_path: Path, capsys) -> None:
    now = time.time()
    root = tmp_path / "models"
    oldest = make_copy(root, "a" * 8, 1000, used=now - 400)
    held = make_copy(root, "b" * 8, 1000, used=now - 300)
    copying = make_copy(root, "c" * 8, 1000, used=now - 200)
    recent = make_copy(root, "d" * 8, 1000, used=now - 100)
    current = make_copy(root, "e" * 8, 1000, used=now)
    stale = make_copy(root, "f" * 8 + ".partial", 500, complete=False)
    resuming = make_copy(root, "g" * 8 + ".partial", 500, complete=False)
    holders = [
        Holder("use", root / f"{held.name}.use"),
        Holder("copy", root / f"{copying.name}.lock"),
        Holder("copy", root / f"{'g' * 8}.lock"),
    ]
    try:
        removed = cache.prune(root, keep=current, bound=2500)
    finally:
        for h in holders:
            h.release()
    # over by 2500: the oldest goes, the held and the copied are skipped, the next least recent goes
    assert removed == [stale, oldest, recent]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        held.name,
        copying.name,
        current.name,
        resuming.name,
    ]
    assert not list(root.glob("*.evicting"))
    assert "in use, over CNA_DIST_CACHE_MAX_BYTES" in capsys.readouterr().err  # 3000 bytes left in copies in use


def test_within_the_bound_nothing_complete_is_removed(tmp_path: Path) -> None:
    root = tmp_path / "models"
    copies = [make_copy(root, f"{i}" * 8, 100, used=time.time() - i) for i in range(3)]
    assert cache.prune(root, keep=copies[0], bound=3 * 108) == []  # 100 bytes and an 8-byte marker each
    assert cache.prune(root, keep=copies[0], bound=None) == []
    assert all(c.is_dir() for c in copies)


@pytest.mark.s3
def test_localize_evicts_the_copy_no_process_holds(
    s3_server: str, tiny_llama: Path, tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy made by a process that has ended is evicted by the next model's copy beyond the bound; the copy this
    process holds is never evicted, even when it alone is over the bound."""
    from cna_dist.model import checkpoint
    from cna_dist.store import uri as urimod

    prefix = f"s3://cna/{uuid.uuid4().hex}"
    for name, model in (("llama", tiny_llama), ("qwen", tiny_qwen)):
        fs, path = urimod.filesystem(f"{prefix}/{name}")
        fs.put(str(model), path, recursive=True)
    env = {**os.environ, "CNA_DIST_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}
    code = "import sys; from cna_dist.model import checkpoint; print(checkpoint.localize(sys.argv[1]))"
    first = subprocess.run([sys.executable, "-c", code, f"{prefix}/llama"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    llama = Path(first.stdout.strip().splitlines()[-1])
    assert (llama / ".complete").exists()
    monkeypatch.setenv("CNA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CNA_DIST_CACHE_MAX_BYTES", "1")  # smaller than any copy
    qwen = checkpoint.localize(f"{prefix}/qwen")
    assert (qwen / ".complete").exists() and not llama.exists()
    assert sorted(p.name for p in qwen.parent.iterdir() if p.is_dir()) == [qwen.name]
    again = checkpoint.localize(f"{prefix}/qwen")  # held by this process: kept, over the bound
    assert again == qwen and (qwen / ".complete").exists()
