"""benchmarks/curvature.py part f at its --quick sizes: the checkpoints end at the scored model, and every row runs."""

from __future__ import annotations

import importlib.util
import io
import re
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

import hookinf

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LDS_CELL = re.compile(r"(-?\d\.\d{4}) ± \d\.\d{4}( \[-?\d\.\d{4} … -?\d\.\d{4}\])?")


@pytest.fixture(scope="module")
def curvature() -> Iterator[Any]:
    """Imports ``benchmarks/curvature.py`` (its helpers ``_memory`` and ``_report`` sit beside it)."""
    name = "hookinf_benchmark_curvature"
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "curvature.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        for key in (name, "_memory", "_report"):
            sys.modules.pop(key, None)


@pytest.fixture(scope="module")
def quick(curvature: Any) -> Any:
    """``--quick --seeds 1 --threads 1``."""
    return replace(curvature.Config.make(quick=True, threads=1), fisher_seeds=1)


def test_checkpoints_end_at_the_model_the_other_rows_score(curvature: Any, quick: Any) -> None:
    d = curvature.digits_setup(quick)
    epochs = quick.lds_epochs
    assert curvature.checkpoint_epochs(epochs) == [2, 5, 7, 10] == d.snapshots.steps
    assert curvature.checkpoint_epochs(30) == [7, 15, 22, 30]  # the full run's
    # snapshotting reads the weights only: the same training without it gives the same model, bit for bit
    plain, none = curvature.train_digits(d.x, d.y, epochs, d.hidden)
    assert none is None
    trained = d.model.state_dict()
    assert all(torch.equal(t, trained[k]) for k, t in plain.state_dict().items())
    # scoring the last checkpoint is scoring the final model (and leaves it as it was)
    before = {k: v.clone() for k, v in d.model.state_dict().items()}
    final = curvature.hookinf_attribution(d, "ekfac", self_scores=False).scores
    options: dict[str, Any] = {"method": "ekfac", "damping": 0.1, "progress": False}
    last = hookinf.influence(
        d.model, d.train, d.query, curvature.LOSS, checkpoints=d.snapshots.checkpoints[-1:], **options
    )
    assert torch.equal(last.per_checkpoint[0].total, final)
    assert all(torch.equal(before[k], v) for k, v in d.model.state_dict().items())
    # the first checkpoint is another model
    assert not torch.equal(d.snapshots.checkpoints[0]["output.weight"], d.model.output.weight)


@pytest.mark.slow
def test_part_f_runs_every_row_with_checkpoints(
    curvature: Any, quick: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kronfluence's runs are stood in for by hookinf's (its true Fisher by other seeds), so that its rows, the
    # differences against them and the summary lines run without it installed
    def kron_attribution(
        d: Any, workdir: Path, strategy: str, empirical: bool, damping: Any, name: str, seed: int = 0, **_: Any
    ) -> Any:
        fisher = "empirical" if empirical else "sampled"
        return curvature.hookinf_attribution(d, strategy, fisher=fisher, seed=seed + 100, self_scores=False)

    monkeypatch.setattr(curvature, "kronfluence", object())
    monkeypatch.setattr(curvature, "kron_attribution", kron_attribution)
    console = Console(file=io.StringIO(), width=150)
    report = curvature.Report(console, "part f")
    results = curvature.Results()
    runs = [
        curvature.DigitsRun(quick, tmp_path, console, curvature.digits_setup(quick, hidden))
        for hidden in (curvature.DIGITS_HIDDEN, curvature.HELD_OUT_HIDDEN)
    ]
    curvature.part_fisher(runs, report, results)

    overview, detail, differences = report.sections
    assert overview.title.startswith("f. Fisher and checkpoints")
    ckpts = "4 checkpoints combined (normalized)"
    expected = [
        "kronfluence empirical Fisher",
        "kronfluence true Fisher, seed 0: mean [range]",
        "hookinf fisher='empirical' (the default)",
        "hookinf fisher='sampled', seed 0: mean [range]",
        f"hookinf fisher='empirical', {ckpts}",
        f"hookinf fisher='sampled', {ckpts}, seed 0: mean [range]",
    ]
    assert [row[1] for row in overview.rows] == expected * 2
    assert [row[0] for row in overview.rows] == ["MLP 64-32-10"] + [""] * 5 + ["MLP 64-64-32-10"] + [""] * 5
    for row in overview.rows:
        for cell in row[2:4]:
            match = LDS_CELL.fullmatch(cell)
            assert match is not None, row
            assert float(match.group(1)) > 0.3, row  # quick sizes give 0.46-0.65; no curvature gives ~0.26
        assert re.fullmatch(r"\d+\.\d\d / \d+\.\d\d", row[4]), row  # fit + scoring seconds, EK-FAC / K-FAC
    details = [row[1] for row in detail.rows]
    assert details[:3] == ["kronfluence empirical Fisher", "kronfluence true Fisher, torch.manual_seed(0)", expected[1]]
    assert detail.rows[0][0] == "MLP 64-32-10"
    assert f"hookinf fisher='sampled', seed=0, {ckpts}" in details
    assert f"hookinf fisher='empirical', {ckpts}" in details

    by_label = {row[1]: row[2:] for row in differences.rows}
    assert by_label["hookinf empirical − kronfluence empirical"] == ["+0.0000 ± 0.0000"] * 2  # the stand-in
    for label in (
        f"hookinf {ckpts} − final model (both fisher='empirical')",
        f"hookinf {ckpts}, fisher='empirical' − kronfluence true (true averaged over seed 0)",
        f"hookinf {ckpts}, fisher='sampled' − kronfluence true (each averaged over seed 0)",
    ):
        assert all(re.fullmatch(r"[+-]\d\.\d{4} ± \d\.\d{4}", cell) for cell in by_label[label]), label
    summaries = [note for note in overview.notes if note.startswith("Checkpoint gain")]
    assert len(summaries) == 2
    for summary, label in zip(summaries, ("MLP 64-32-10", "MLP 64-64-32-10"), strict=True):
        assert summary.startswith(f"Checkpoint gain, {label}: 4 checkpoints (epochs 2, 5, 7, 10; fisher='empirical')")
        assert "kronfluence's true Fisher (averaged over seed 0): EK-FAC " in summary
    assert len(results.fisher) == 4  # the targets' sampled-vs-true verdicts, per model and method
    assert "### f2. Fisher and checkpoints" in report.markdown()
