"""Persistence of retrieval: resuming ``hookinf.precondition_store``, and saving and loading a FAISS index.

Faults are real: a forked child of a fresh interpreter runs ``precondition_store`` (or ``FaissIndex.save``) with
``os.replace`` or ``os.unlink`` wrapped to ``SIGKILL`` it at the call's ``k``-th use, for every ``k`` until the run
completes: a kill at every rename and removal the run makes. The oracle is an uninterrupted run of the same source
store and curvature: a resumed store must be bit-identical to it (the same manifest, shard checksums, ids and
tensors), and it must keep, not rewrite, the shards written before the kill.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ModelCase
from test_retrieval import LOGRA, mlp
from test_retrieval import log as retrieval_log
from test_store_faults import KILLED_AT

import hookinf
from hookinf import HookinfWarning, StoreError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX faults (SIGKILL, fork)")

KILLS = (
    """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
import hookinf

root = sys.argv[1]
store = hookinf.GradientStore(os.path.join(root, "store"))
curvature = hookinf.load(os.path.join(root, "curvature"))
"""
    + KILLED_AT
    + """
out = {"precondition": [], "faiss": None}
for call in ("replace", "unlink"):
    for k in range(1, 60):
        target = os.path.join(root, f"pre-{call}-{k}")
        killed = killed_at(call, k, lambda: hookinf.precondition_store(store, curvature, target, progress=False))
        out["precondition"].append([target, killed])
        if not killed:
            break
try:
    import faiss
except ImportError:
    faiss = None
if faiss is not None:
    from hookinf.faiss_index import FaissIndex

    faiss.omp_set_num_threads(1)
    pre = hookinf.PreconditionedStore(out["precondition"][-1][0])
    file = os.path.join(root, "index.faiss")
    FaissIndex.build(pre, kind="flat").save(file)
    newer = FaissIndex.build(pre, kind="ivf", nlist=4, nprobe=4)
    out["faiss"] = [file, killed_at("replace", 1, lambda: newer.save(file))]
print(json.dumps(out), flush=True)
os._exit(0)  # skips the interpreter's teardown (seconds of torch's on a loaded machine): nothing is left to flush
"""
)


def log(case: ModelCase, train: list[Any], path: Path, **kwargs: Any) -> hookinf.GradientStore:
    """``test_retrieval.log`` with a shard per batch of 4."""
    return retrieval_log(case, train, path, flush_every=4, **kwargs)


@pytest.fixture(scope="module")
def kills(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A source store of 6 shards and a curvature (saved, so both interpreters use the same bytes), and the runs."""
    root = tmp_path_factory.mktemp("kills")
    case = mlp()
    train = [case.make_batch(seed) for seed in range(1, 5)]  # 16 rows, 4 shards
    log(case, train, root / "store")
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="ekfac", compress=LOGRA, progress=False)
    curvature.save(root / "curvature")
    proc = subprocess.run(
        [sys.executable, "-c", KILLS, str(root)], capture_output=True, text=True, timeout=300, env=_environment()
    )
    assert proc.returncode == 0, f"the script failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    runs: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    source = hookinf.GradientStore(root / "store")
    curvature = hookinf.load(root / "curvature")
    reference = hookinf.precondition_store(source, curvature, root / "reference", progress=False)
    return {"root": root, "runs": runs, "source": source, "curvature": curvature, "reference": reference}


def _environment() -> dict[str, str]:
    """This environment, with the checkout under test first on the child's path."""
    env = dict(os.environ)
    checkout = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([checkout, *filter(None, [env.get("PYTHONPATH")])])
    return env


def assert_identical(got: hookinf.PreconditionedStore, expected: hookinf.PreconditionedStore, what: str) -> None:
    """The same manifest, the same shards (row counts and SHA-256s, in order), ids and tensors, to the last bit."""
    __tracebackhide__ = True
    assert json.loads((got.path / "manifest.json").read_text()) == json.loads(
        (expected.path / "manifest.json").read_text()
    ), what
    assert [(s.count, s.sha256) for s in got.gradients.shards] == [
        (s.count, s.sha256) for s in expected.gradients.shards
    ], what
    assert got.identity() == expected.identity(), what
    for (got_ids, got_part), (ids, part) in zip(got.chunks(), expected.chunks(), strict=True):
        assert torch.equal(got_ids, ids), what
        for name in part:
            assert torch.equal(got_part[name], part[name]), f"{what}: layer {name}"


def listed_files(path: Path) -> list[tuple[str, int, int]]:
    """The listed shards of ``path/gradients`` in order: name, inode and modification time (a rewrite changes them)."""
    if not (path / "gradients" / "manifest.json").exists():
        return []
    files = [path / "gradients" / s.file for s in hookinf.GradientStore(path / "gradients").shards]
    return [(file.name, file.stat().st_ino, file.stat().st_mtime_ns) for file in files]


def resume(kills: dict[str, Any], target: Path, curvature: Any = None, **kwargs: Any) -> tuple[Any, list[str]]:
    """``precondition_store`` into ``target``, with the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = hookinf.precondition_store(
            kills["source"], curvature or kills["curvature"], target, progress=False, **kwargs
        )
    return out, [str(w.message) for w in caught if issubclass(w.category, HookinfWarning)]


def test_precondition_store_killed_at_each_write_resumes_bit_identical(kills: dict[str, Any], tmp_path: Path) -> None:
    runs, reference = kills["runs"]["precondition"], kills["reference"]
    assert [killed for _, killed in runs].count(False) == 2, "each kind of call ends with a run that completes"
    assert len(runs) >= 12, runs  # run.json, then a shard and the manifest per source shard (4), the manifest
    kept_some = 0
    for target, killed in runs:
        path = tmp_path / Path(target).name  # a copy: the other tests see the runs as the kills left them
        shutil.copytree(target, path)
        finished = (path / "manifest.json").exists()
        if not finished:  # nothing half-written is read back
            with pytest.raises(StoreError, match="did not finish"):
                hookinf.PreconditionedStore(path)
        written = listed_files(path)
        resumed, said = resume(kills, path)
        assert_identical(resumed, reference, f"{target} (killed: {killed})")
        assert listed_files(path)[: len(written)] == written, f"{target}: shards written before the kill were rewritten"
        assert not (path / "run.json").exists(), target
        for directory in (path, path / "gradients"):  # what the kill left is cleaned up
            assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")], directory
        if written and not finished:
            kept_some += 1
            assert len(said) == 1, said
            assert f"{4 * len(written)} of 16 rows were written already" in said[0], said
        else:
            assert not said, said
    assert kept_some >= 6, "vacuous: few kills left shards to keep"


def test_precondition_store_refuses_another_runs_store_unless_overwrite(kills: dict[str, Any], tmp_path: Path) -> None:
    runs, source, curvature = kills["runs"]["precondition"], kills["source"], kills["curvature"]
    unfinished = [Path(t) for t, killed in runs if killed and (Path(t) / "run.json").exists()]
    partial = tmp_path / "partial"
    shutil.copytree(unfinished[len(unfinished) // 2], partial)
    assert 0 < len(hookinf.GradientStore(partial / "gradients")) < 16, "vacuous: not a partial store"
    other = curvature.with_damping(hookinf.Damping(absolute=1.0))
    with pytest.raises(StoreError, match=r"unfinished preconditioned store of another run \(curvature: ekfac"):
        hookinf.precondition_store(source, other, partial, progress=False)
    with pytest.raises(StoreError, match=r"dtype: float64 → float32"):
        hookinf.precondition_store(source, curvature, partial, dtype=torch.float32, progress=False)
    case = mlp()
    longer = log(case, [case.make_batch(seed) for seed in range(1, 6)], tmp_path / "longer")
    with pytest.raises(StoreError, match=r"source store rows: 16 → 20"):
        hookinf.precondition_store(longer, curvature, partial, progress=False)
    with pytest.raises(StoreError, match=r"holds a 'hookinf.gradient-store', not a preconditioned store"):
        hookinf.precondition_store(source, curvature, longer.path, overwrite=True, progress=False)
    assert len(hookinf.GradientStore(longer.path)) == 20, "the gradient store was touched"

    replaced, said = resume(kills, partial, other, overwrite=True)
    assert not said
    fresh = hookinf.precondition_store(source, other, tmp_path / "fresh", progress=False)
    assert_identical(replaced, fresh, "overwritten with another curvature")
    with pytest.raises(StoreError, match="another run is there already"):
        hookinf.precondition_store(source, curvature, partial, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (partial / "gradients").iterdir()}
    again, said = resume(kills, partial, other)  # the finished store of this very run: returned as it is
    assert not said
    assert {p.name: p.stat().st_mtime_ns for p in (partial / "gradients").iterdir()} == before
    assert_identical(again, fresh, "returned as it is")

    (partial / "manifest.json").unlink()
    with pytest.raises(StoreError, match=r"16 preconditioned rows with no record \(run.json\)"):
        hookinf.precondition_store(source, other, partial, progress=False)


# ---------------------------------------------------------------------------------------------------- FAISS
def test_a_saved_faiss_index_loads_and_searches_the_same(kills: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'hookinf[faiss]')")
    from hookinf.faiss_index import FaissIndex

    pre, case = kills["reference"], mlp()
    query = [case.make_batch(50), case.make_batch(51)]
    built = FaissIndex.build(pre, kind="ivf", nlist=4, nprobe=3)
    built.save(tmp_path / "index.faiss")
    loaded = FaissIndex.load(tmp_path / "index.faiss", hookinf.PreconditionedStore(pre.path))
    assert (loaded.kind, loaded.index.nprobe, loaded.index.ntotal) == ("ivf", 3, 16)
    got = loaded.top_k(case.model, query, case.loss_fn, k=5, progress=False)
    expected = built.top_k(case.model, query, case.loss_fn, k=5, progress=False)
    for field in ("harmful", "helpful", "harmful_scores", "helpful_scores", "harmful_ids", "helpful_ids"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_faiss_index_refuses_another_store_or_a_damaged_file(kills: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'hookinf[faiss]')")
    from hookinf.faiss_index import FaissIndex

    source, curvature, case = kills["source"], kills["curvature"], mlp()
    pre = hookinf.precondition_store(source, curvature, tmp_path / "pre", progress=False)
    file = tmp_path / "index.faiss"
    FaissIndex.build(pre, kind="flat").save(file)
    other = curvature.with_damping(hookinf.Damping(absolute=1.0))
    elsewhere = hookinf.precondition_store(source, other, tmp_path / "other", progress=False)
    with pytest.raises(StoreError, match=f"another curvature \\(ekfac {pre.record.curvature}\\)"):
        FaissIndex.load(file, elsewhere)
    # the same path written again from another source store: other rows, other ids, other gradients
    train = [case.make_batch(seed) for seed in range(1, 5)]
    counter = itertools.count(100)
    changes = [
        (r"rows: 16 → 20", [*train, case.make_batch(5)], {}),
        (r"ids digest", train, {"ids": lambda batch: [next(counter) for _ in range(4)]}),
        (r"gradients \(the same ids\): content digest", [case.make_batch(seed) for seed in range(11, 15)], {}),
    ]
    for number, (expected, data, kwargs) in enumerate(changes):
        changed = log(case, data, tmp_path / f"source-{number}", **kwargs)
        rewritten = hookinf.precondition_store(changed, curvature, tmp_path / "pre", overwrite=True, progress=False)
        with pytest.raises(StoreError, match=f"another store than .*{expected}"):
            FaissIndex.load(file, rewritten)
    hookinf.precondition_store(source, curvature, tmp_path / "pre", overwrite=True, progress=False)
    assert FaissIndex.load(file, hookinf.PreconditionedStore(tmp_path / "pre")).index.ntotal == 16  # the same again

    data = bytearray(file.read_bytes())
    for at, expected in ((100, "SHA-256"), (len(data) - 40, "unreadable FAISS index record")):
        damaged = tmp_path / f"damaged-{at}.faiss"
        damaged.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
        with pytest.raises(StoreError, match=expected):
            FaissIndex.load(damaged, pre)
    (tmp_path / "short.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="not a hookinf FAISS index file"):
        FaissIndex.load(tmp_path / "short.faiss", pre)
    with pytest.raises(StoreError, match="cannot read the FAISS index"):
        FaissIndex.load(tmp_path / "missing.faiss", pre)


def test_a_faiss_save_killed_at_its_rename_leaves_the_previous_index(kills: dict[str, Any]) -> None:
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'hookinf[faiss]')")
    from hookinf.faiss_index import FaissIndex

    file, killed = kills["runs"]["faiss"]
    assert killed
    loaded = FaissIndex.load(file, kills["reference"])
    assert loaded.kind == "flat", "the killed save of the ivf index replaced the flat one"
