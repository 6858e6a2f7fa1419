"""The one data path: Watch emits Steps to consumers; transforms run once; hooks go whatever a consumer raises.

Also the typed curvature state (``LayerStatistics`` per layer, the compressor as a field compared by ``merge``) and
the package's shape (no file over 400 lines; the import contracts themselves run as ``lint-imports`` in ./dev test).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hookinf
from hookinf import CompressorMismatchError, CurvatureError
from hookinf.capture import Step
from hookinf.compress import BoundCompressor
from hookinf.methods.kfac import KFACFactors
from hookinf.pipeline import Collect, Pipeline, Rescale, close_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup() -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    return model, [(x[i : i + 6], y[i : i + 6]) for i in range(0, 24, 6)]


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def module_hooks(model: nn.Module) -> int:
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, a)) for m in model.modules() for a in attrs)


class Recorder:
    def __init__(self, fail_on_consume: bool = False, fail_on_close: bool = False) -> None:
        self.steps: list[Step] = []
        self.closed = 0
        self.fail_on_consume, self.fail_on_close = fail_on_consume, fail_on_close

    def consume(self, step: Step) -> None:
        if self.fail_on_consume:
            raise RuntimeError("consumer failed")
        self.steps.append(step)

    def close(self) -> None:
        self.closed += 1
        if self.fail_on_close:
            raise RuntimeError("close failed")


def run_loop(watch: hookinf.Watch, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> None:
    with watch:
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()


# ---------------------------------------------------------------------------------------------------- consumers
def test_every_step_reaches_every_consumer_once_and_each_is_closed_once(setup: Any) -> None:
    model, batches = setup
    first, second = Recorder(), Recorder()
    run_loop(hookinf.Watch(model, consumers=[first, second]), model, batches)
    assert [s.index for s in first.steps] == [s.index for s in second.steps] == [0, 1, 2, 3]
    assert first.steps[0] is second.steps[0]  # the same Step object, not a copy per consumer
    assert first.closed == second.closed == 1


@pytest.mark.parametrize("where", ["consume", "close"])
def test_hooks_are_removed_whatever_a_consumer_raises(setup: Any, where: str) -> None:
    model, batches = setup
    failing = Recorder(fail_on_consume=where == "consume", fail_on_close=where == "close")
    other = Recorder()
    before = module_hooks(model)
    with pytest.raises(RuntimeError, match="failed"):
        run_loop(hookinf.Watch(model, consumers=[failing, other]), model, batches)
    assert module_hooks(model) == before
    assert other.closed == 1  # closed although the first consumer raised
    with hookinf.watch(model) as w:  # no active-watch entry left behind
        F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
        assert w.per_example_gradients()["0"].shape == (6, 7, 6)


def test_a_store_write_that_fails_on_a_full_disk_leaves_no_hook(tmp_path: Path) -> None:
    """A real fault: the process's file-size limit (RLIMIT_FSIZE) makes the shard write fail with EFBIG."""
    script = textwrap.dedent(
        f"""
        import json, resource, signal
        import torch, torch.nn.functional as F
        from torch import nn
        import hookinf

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with OSError(EFBIG) instead
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(50, 40), nn.Tanh(), nn.Linear(40, 3))
        attrs = ("_forward_hooks", "_forward_pre_hooks")
        count = lambda: sum(len(getattr(m, a)) for m in model.modules() for a in attrs)
        before = count()
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))  # a manifest fits, a shard not
        error = None
        try:
            with hookinf.watch(model, log_to={str(tmp_path / "grads")!r}, compress=hookinf.Dropout(r=200)) as w:
                for i in range(3):
                    w.tag(range(8 * i, 8 * i + 8))
                    F.cross_entropy(model(torch.randn(8, 50)), torch.randint(0, 3, (8,))).backward()
        except Exception as err:
            error = type(err).__name__ + ": " + str(err)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        left = count() - before
        with hookinf.watch(model) as w:  # the model can be watched again
            F.cross_entropy(model(torch.randn(2, 50)), torch.randint(0, 3, (2,))).backward()
            again = w.steps
        print(json.dumps({{"error": error, "left": left, "again": again}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] is not None
    assert "File too large" in result["error"], result
    assert result["left"] == 0
    assert result["again"] == 1


def test_close_all_closes_every_consumer_and_raises_the_first_error() -> None:
    consumers = [Recorder(fail_on_close=True), Recorder(), Recorder(fail_on_close=True)]
    with pytest.raises(RuntimeError, match="close failed"):
        close_all(consumers)
    assert [c.closed for c in consumers] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------------- transforms
def test_rescale_scales_every_gradient_and_keeps_ids(setup: Any) -> None:
    model, batches = setup
    collected = Collect()
    with hookinf.Watch(model, consumers=[Pipeline([collected], [Rescale(lambda step: 0.5 * step.batch_size)])]) as w:
        w.tag(torch.arange(6))
        F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
        plain = w.per_example_gradients()
        scaled = collected.take()
    assert scaled.ids is not None
    assert scaled.ids.tolist() == list(range(6))
    for name, grads in scaled.gradients().items():
        torch.testing.assert_close(grads, 3.0 * plain[name], rtol=1e-15, atol=0.0)  # one rounding at most


def test_a_watch_that_fits_and_logs_compresses_each_step_once_in_its_hooks(
    setup: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, batches = setup
    built: list[tuple[int, str]] = []
    capture = BoundCompressor.capture
    watches: list[hookinf.Watch] = []

    def spy(self: BoundCompressor, layer: str, a: Tensor, delta: Tensor, adapter: Any) -> Any:
        built.append((watches[0].steps, layer))  # the step being closed: the watch counts it once it is built
        return capture(self, layer, a, delta, adapter)

    def refuse(self: BoundCompressor, step: Step) -> Step:
        raise AssertionError("a compressed watch must not compress its steps again")

    monkeypatch.setattr(BoundCompressor, "capture", spy)
    monkeypatch.setattr(BoundCompressor, "compress", refuse)
    with hookinf.watch(model, fit="kfac", log_to=tmp_path / "g", compress=hookinf.LoGra(3, 2)) as w:
        watches.append(w)
        for i, (x, y) in enumerate(batches):
            w.tag(range(6 * i, 6 * i + 6))
            F.cross_entropy(model(x), y).backward()
    assert built == [(step, layer) for step in range(4) for layer in ("0", "2")]
    assert len(w.store) == 24
    assert w.curvature().num_examples == 24


# ---------------------------------------------------------------------------------------------------- typed state
def test_curvature_state_is_typed_and_the_flat_view_is_derived(setup: Any) -> None:
    model, batches = setup
    curvature = hookinf.fit(model, batches, loss_fn, method="kfac", progress=False)
    stats = curvature.state["0"]
    assert isinstance(stats, KFACFactors)
    assert stats.A.shape == (6, 6)
    assert stats.S.shape == (7, 7)
    assert float(stats.positions) == 24
    assert set(curvature.tensors) == {f"{layer}/{key}" for layer in ("0", "2") for key in ("A", "S", "positions")}
    assert curvature.compressor is None
    assert curvature.extra == {}
    with pytest.raises(CurvatureError, match="KFACFactors"):
        type(curvature)(curvature.layers, curvature.damping, 24, {"0": stats})


def test_merge_refuses_curvatures_fitted_in_different_compressed_spaces(setup: Any, tmp_path: Path) -> None:
    model, batches = setup
    fits = {
        seed: hookinf.fit(model, batches, loss_fn, method="kfac", compress=hookinf.LoGra(3, 2, seed=seed), progress=0)
        for seed in (0, 1)
    }
    assert fits[0].compressor == hookinf.LoGra(3, 2, seed=0)
    with pytest.raises(CompressorMismatchError, match="different spaces"):
        fits[0].merge(fits[1])
    plain = hookinf.fit(model, batches, loss_fn, method="kfac", progress=False)
    with pytest.raises(CompressorMismatchError):
        plain.merge(fits[0])
    loaded = hookinf.load(fits[0].save(tmp_path / "c"))
    assert loaded.compressor == fits[0].compressor
    merged = loaded.merge(fits[0])  # the same space: sums add
    torch.testing.assert_close(merged.stat("0", "A"), 2 * fits[0].stat("0", "A"), rtol=0, atol=0)


def test_a_curvature_saved_with_the_compressor_under_extra_still_loads(setup: Any, tmp_path: Path) -> None:
    model, batches = setup
    curvature = hookinf.fit(model, batches, loss_fn, method="exact", compress=hookinf.LoGra(3, 2), progress=False)
    path = curvature.save(tmp_path / "c")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["extra"] = {"compressor": manifest.pop("compressor")}  # the layout files had before this change
    manifest.pop("manifest_sha256", None)  # ... which had no manifest checksum either
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = hookinf.load(path)
    assert loaded.compressor == hookinf.LoGra(3, 2)
    torch.testing.assert_close(loaded.stat("0", "gram"), curvature.stat("0", "gram"), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- package shape
def test_no_module_of_the_package_is_longer_than_400_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / "hookinf").rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert not long, f"split these modules (STYLE.md: no god file): {long}"


def test_module_names_are_not_shadowed_by_the_functions_they_define() -> None:
    import importlib

    assert callable(hookinf.watch)
    assert callable(hookinf.influence)
    for name in ("hooks", "loop", "helpers", "runner", "pipeline", "selection", "shapes"):
        module = importlib.import_module(f"hookinf.{name}")
        assert getattr(hookinf, name, module) is module, f"hookinf.{name} is not the module"
