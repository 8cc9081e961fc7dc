"""benchmarks/gpu_checks.py runs its comparisons on the CPU too, so the GPU script is not dead code,
and a mismatch fails it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_mismatch_is_a_failure() -> None:
    checks = load_script()
    want = np.linspace(-3, 3, 60, dtype=np.float32).reshape(3, 2, 10)
    failures: list[str] = []
    checks.compare("same", want.copy(), want, "float32", failures)
    assert failures == []
    wrong = want.copy()
    wrong[1, 1, 4] += 0.01  # one value off by 3e-3 of the largest: a weight read from the wrong layer is far worse
    checks.compare("one value", wrong, want, "float32", failures)
    checks.compare("shape", want[:2], want, "float32", failures)
    assert failures == ["one value", "shape"]


@pytest.mark.slow
def test_the_cpu_parts_run_and_pass() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--prompts", "6"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    assert result.stdout.count("  ok   stream") == 12 and result.stdout.count("float16 overflow") >= 6
