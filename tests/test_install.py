"""The install story: ``pip install hookinf`` (the core: torch, opt-einsum, rich, safetensors) in a fresh venv.

A fresh virtual environment gets the lock's torch and the package built from this checkout with its declared
dependencies, nothing else — no numpy, scikit-learn, matplotlib or pandas — and must fit, save, load, log into a
store and score from it; the optional features must then fail with their one-line "install hookinf[extra]" message,
never a traceback. It builds a venv and installs torch (from the machine's wheel cache): about a minute.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FLOW = textwrap.dedent(
    """
    import importlib.util, tempfile
    import torch, torch.nn.functional as F
    from torch import nn
    import hookinf

    missing = [m for m in ("numpy", "sklearn", "matplotlib", "pandas", "transformers") if importlib.util.find_spec(m)]
    assert not missing, f"not a core install: {missing}"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")
    out = tempfile.mkdtemp()
    curvature = hookinf.fit(model, data, loss, method="kfac", progress=False)
    assert torch.equal(hookinf.load(curvature.save(out + "/c")).stat("0", "A"), curvature.stat("0", "A"))
    scores = hookinf.influence(model, data, data[:1], loss, method=curvature, progress=False)
    assert torch.equal(hookinf.load_scores(scores.save(out + "/s")).total, scores.total)
    logra = hookinf.LoGra(2, 2)
    store = hookinf.log(model, data, loss, compress=logra, path=out + "/g", progress=False)
    assert len(hookinf.GradientStore(out + "/g")) == 15
    from_store = hookinf.influence(model, store, data[:1], loss, compress=logra, method="exact", progress=False)
    direct = hookinf.influence(model, data, data[:1], loss, compress=logra, method="exact", progress=False)
    assert torch.allclose(from_store.total, direct.total, rtol=1e-5, atol=1e-7)
    scores.report()
    try:
        scores.save_html(out + "/r.html")
    except hookinf.ConfigurationError as err:
        assert "pip install 'hookinf[report]'" in str(err), err
    else:
        raise AssertionError("save_html without matplotlib did not say what to install")
    print("core install: OK")
    """
)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_a_core_install_fits_saves_loads_logs_and_scores_and_names_the_extras(tmp_path: Path) -> None:
    torch_pin = re.search(r"^torch==\S+$", (ROOT / "requirements" / "dev.lock").read_text(), re.MULTILINE)
    assert torch_pin is not None
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # the lock's CPU torch first (a bare `torch>=2.4` would fetch a CUDA build), then the package and its
    # declared dependencies
    installed = _run([str(python), "-m", "pip", "install", "--quiet", torch_pin.group(0), str(ROOT)], timeout=900)
    assert installed.returncode == 0, installed.stderr[-4000:]
    flow = _run([str(python), "-c", FLOW], timeout=300)
    assert flow.returncode == 0, flow.stderr[-4000:]
    assert "core install: OK" in flow.stdout
    demo = _run([str(python), "-m", "hookinf", "demo"], timeout=120)
    assert demo.returncode == 1
    assert "pip install 'hookinf[examples]'" in demo.stderr
    assert "Traceback" not in demo.stderr
