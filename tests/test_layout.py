"""The tree's promises: the CNA math imports no torch and no I/O; storage imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = (
    "import sys, importlib; importlib.import_module(sys.argv[1]); "
    "print(' '.join(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('cna_dist', 'fsspec', 'ray')))))"
)


def loaded(module: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["cna_dist.core.reduce", "cna_dist.core.metrics", "cna_dist.core.diff"])
def test_core_is_plain_math(module: str) -> None:
    assert loaded(module) <= {"cna_dist", "cna_dist.core", module}


@pytest.mark.parametrize("module", ["cna_dist.io.store", "cna_dist.io.stream", "cna_dist.io.registry"])
def test_storage_needs_no_torch_and_no_ray(module: str) -> None:
    found = loaded(module)
    assert "torch" not in found and "ray" not in found
    assert not any(m.startswith(("cna_dist.model", "cna_dist.runtime")) for m in found)
