"""The dev-environment benchmarks still run: each one's ``--quick`` mode, as a subprocess, must exit cleanly.

They import hookinf's internals (a runner, an accumulator, a store's index) and are not imported by the library, so a
refactor can break them silently; a benchmark that no longer runs is caught here instead of at the next measurement.
Their numbers are not checked (timings are never asserted in tests); the quick modes write no results file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        ["benchmarks/retrieval.py", "--quick"],
        ["benchmarks/ekfac_breakdown.py", "--quick", "--repeats", "1"],
        ["benchmarks/distributed.py", "--quick"],
        ["benchmarks/lora_gpt2.py", "--quick"],
        ["benchmarks/lora_gpt2.py", "--quick", "--dtype", "bfloat16"],  # the GPU run's bf16 weights and autocast
    ],
    ids=["retrieval", "ekfac_breakdown", "distributed", "lora_gpt2", "lora_gpt2_bf16"],
)
def test_benchmark_quick_mode_runs(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
