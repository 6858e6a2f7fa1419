"""Real faults against saving: a full disk, two writers, kills at every rename, leftovers of killed runs.

Faults are real, never a patch of hookinf's own functions: a file-size limit (``RLIMIT_FSIZE`` with ``SIGXFSZ``
ignored, so a write fails with ``EFBIG`` as on a full disk) in a subprocess; writers in other processes, killed with
``SIGKILL``; ``os.replace`` wrapped (in a forked child) to ``SIGKILL`` the process at its ``k``-th call, for every
``k`` until the save completes. The oracle for a resumed or rerun store is an uninterrupted run of the same data.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_store import LOGRA, SAME_TOL, assert_same_store, assert_whole_shards, batches, log, mlp

import hookinf
from hookinf import HookinfError, StoreError

TESTS_DIR = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX faults (rlimits, SIGKILL, fork)")

PRELUDE = """
import json, os, resource, signal, sys, time
import torch
sys.path.insert(0, {tests!r})
from conftest import MODEL_CASES
import hookinf

torch.set_num_threads(1)
case = MODEL_CASES["mlp-bias"]()
train = [case.make_batch(seed) for seed in range(1, 7)]
LOGRA = hookinf.LoGra(3, 2)
"""


def run_script(body: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Runs ``PRELUDE + body`` in a fresh interpreter; returns the JSON object it prints last."""
    code = PRELUDE.format(tests=str(TESTS_DIR)) + body
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"the script failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def temporaries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------------- 1. a full disk
FULL_DISK = """
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
root = sys.argv[1]
SOFT, HARD = resource.getrlimit(resource.RLIMIT_FSIZE)

def disk_full(on):
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 if on else SOFT, HARD))  # 64 bytes: less than any file we write

def hooks():
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in case.model.modules())

def failure(run):
    try:
        run()
    except BaseException as err:
        cause = err.__cause__
        return {"type": type(err).__name__, "store_error": isinstance(err, hookinf.StoreError),
                "hookinf_error": isinstance(err, hookinf.HookinfError), "message": str(err),
                "cause": type(cause).__name__, "errno": getattr(cause, "errno", None), "hooks": hooks()}
    finally:
        disk_full(False)
    return None

def logged(path, data, **kw):
    return hookinf.log(case.model, data, case.loss_fn, compress=LOGRA, path=path, modules=case.modules,
                       flush_every=4, progress=False, **kw)

def ids_of(path):
    return sorted(hookinf.GradientStore(path).ids.tolist())

out = {}

# watch(log_to=): batches 0, 1 are stored, then the disk fills; batch 2's shard fails in the writer thread
path = os.path.join(root, "watch")
def watched():
    with hookinf.watch(case.model, log_to=path, compress=LOGRA, flush_every=4, modules=case.modules) as w:
        for k, batch in enumerate(train):
            if k == 3:
                deadline = time.monotonic() + 30
                while len(hookinf.GradientStore(path)) < 8 and time.monotonic() < deadline:
                    time.sleep(0.005)  # shards 0 and 1 are durable (read from disk) before the disk fills
                disk_full(True)
            w.tag(range(4 * k, 4 * k + 4))
            case.loss_fn(case.model, batch).mean().backward()
out["watch"] = failure(watched)
with hookinf.watch(case.model) as w:  # the model is free: a new watch enters and captures
    case.loss_fn(case.model, train[0]).mean().backward()
    out["watch_again"] = sorted(w.per_example_gradients())
case.model.zero_grad(set_to_none=True)
out["watch_ids"] = ids_of(path)
out["watch_tmp"] = sorted(n for n in os.listdir(path) if n.endswith(".tmp"))

# hookinf.log: a resume whose first new shard hits the full disk
path = os.path.join(root, "log")
logged(path, train[:2])
disk_full(True)
out["log"] = failure(lambda: logged(path, train))
out["log_ids"] = ids_of(path)
logged(path, train)  # the same process resumes: the failed run released the store's lock
out["log_rerun"] = ids_of(path)

# a store that cannot even be created
path = os.path.join(root, "fresh")
disk_full(True)
out["fresh"] = failure(lambda: logged(path, train))

# Scores.save and Curvature.save over an earlier save
old = hookinf.Scores({"fc1": torch.zeros(2, 3), "fc2": torch.ones(2, 3)}, method="old")
new = hookinf.Scores({"fc1": torch.full((2, 3), 5.0), "fc2": torch.ones(2, 3)}, method="new")
path = os.path.join(root, "scores")
old.save(path)
disk_full(True)
out["scores"] = failure(lambda: new.save(path))
out["scores_files"] = sorted(os.listdir(path))
path = os.path.join(root, "self-scores")
hookinf.SelfScores({"fc1": torch.zeros(3), "fc2": torch.ones(3)}, method="old").save(path)
disk_full(True)
out["self-scores"] = failure(lambda: hookinf.SelfScores({"fc1": torch.full((3,), 5.0)}, method="new").save(path))
out["self-scores_files"] = sorted(os.listdir(path))
curvature = hookinf.fit(case.model, train[:2], case.loss_fn, method="kfac", progress=False)
bigger = hookinf.fit(case.model, train, case.loss_fn, method="kfac", progress=False)
path = os.path.join(root, "curvature")
curvature.save(path)
disk_full(True)
out["curvature"] = failure(lambda: bigger.save(path))
out["curvature_files"] = sorted(os.listdir(path))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("full-disk")
    return root, run_script(FULL_DISK, str(root))


def assert_names_the_target(failure: dict[str, Any] | None, target: Path, kind: str) -> None:
    __tracebackhide__ = True
    assert failure is not None, "the write under a full disk did not fail"
    assert failure["type"] == kind, failure
    assert failure["hookinf_error"], failure
    assert str(target) in failure["message"], failure
    assert ".tmp" not in failure["message"], f"the message names a temporary file: {failure['message']}"
    assert "File too large" in failure["message"], failure  # the cause, in words
    assert (failure["cause"], failure["errno"]) == ("OSError", 27), failure  # chained from the EFBIG OSError
    assert failure["hooks"] == 0, f"{failure['hooks']} hooks left on the model"


def test_a_full_disk_inside_watch_raises_store_error_and_the_store_resumes(
    full_disk: tuple[Path, dict[str, Any]],
) -> None:
    root, out = full_disk
    path = root / "watch"
    assert_names_the_target(out["watch"], path, "StoreError")
    assert out["watch_again"] == ["fc1", "fc2"]
    assert out["watch_ids"] == list(range(8)), "the shards written before the disk filled are not all there"
    assert out["watch_tmp"] == [], "a failed write left its temporary file"
    assert_whole_shards(hookinf.GradientStore(path))

    case = mlp()  # a rerun (here: another process) completes the store, every id once
    train = batches(case, 6)
    reference = log(case, train, path.parent / "watch-reference")
    optimizer = torch.optim.SGD(case.model.parameters(), lr=0.0)
    with hookinf.watch(case.model, log_to=path, compress=LOGRA, flush_every=4, modules=case.modules) as w:
        for k, batch in enumerate(train):
            w.tag(range(4 * k, 4 * k + 4))
            optimizer.zero_grad()
            case.loss_fn(case.model, batch).mean().backward()
    assert_same_store(hookinf.GradientStore(path), reference, SAME_TOL, "rerun after a full disk")


def test_a_full_disk_inside_log_raises_store_error_and_a_rerun_completes(
    full_disk: tuple[Path, dict[str, Any]],
) -> None:
    root, out = full_disk
    assert_names_the_target(out["log"], root / "log", "StoreError")
    assert out["log_ids"] == list(range(8))
    assert out["log_rerun"] == list(range(24))
    case = mlp()
    assert_same_store(hookinf.GradientStore(root / "log"), log(case, batches(case, 6), root / "ref"), SAME_TOL, "rerun")
    assert_names_the_target(out["fresh"], root / "fresh", "StoreError")


def test_a_full_disk_fails_scores_self_scores_and_curvature_saves_and_keeps_the_old_ones(
    full_disk: tuple[Path, dict[str, Any]],
) -> None:
    root, out = full_disk
    assert_names_the_target(out["scores"], root / "scores", "HookinfError")
    assert_names_the_target(out["curvature"], root / "curvature", "CurvatureError")
    assert_names_the_target(out["self-scores"], root / "self-scores", "HookinfError")
    for what in ("scores", "curvature", "self-scores"):
        assert not [n for n in out[f"{what}_files"] if n.endswith(".tmp")], out[f"{what}_files"]
    scores = hookinf.load_scores(root / "scores")
    assert scores.method == "old"
    assert torch.equal(scores.per_layer["fc1"], torch.zeros(2, 3))
    own = hookinf.load_self_scores(root / "self-scores")
    assert own.method == "old"
    assert torch.equal(own.total, torch.ones(3, dtype=torch.float64))
    assert hookinf.load(root / "curvature").num_examples == 8


# ---------------------------------------------------------------------------------------------------- 2. two writers
HOLDER = """
path, gate, mode = sys.argv[1], sys.argv[2], sys.argv[3]

def held_loss(model, batch):
    if batch is train[1]:  # batch 0 is logged; hold the store until the test opens the gate
        if mode == "fork":  # a child that outlives us, as a data-loader worker may
            child = os.fork()
            if child == 0:
                quiet = os.open(os.devnull, os.O_WRONLY)
                os.dup2(quiet, 1)  # let the test read our parent's output to its end
                os.dup2(quiet, 2)
                time.sleep(60)
                os._exit(0)
            print(f"child {child}", flush=True)
        print("holding", flush=True)
        while not os.path.exists(gate):
            time.sleep(0.01)
    return case.loss_fn(model, batch)

hookinf.log(case.model, train[:4], held_loss, compress=LOGRA, path=path, modules=case.modules, flush_every=4,
            progress=False)
print("finished", flush=True)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Any]:
    """Starts a writer process on ``tmp_path / 'store'`` that holds the store until ``tmp_path / 'gate'`` exists."""
    procs: list[subprocess.Popen[str]] = []
    children: list[int] = []

    def start(mode: str = "plain") -> subprocess.Popen[str]:
        code = PRELUDE.format(tests=str(TESTS_DIR)) + HOLDER
        args = [sys.executable, "-c", code, str(tmp_path / "store"), str(tmp_path / "gate"), mode]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        while True:  # blocks until the writer holds the store (or dies)
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"the writer exited before holding the store:\n{proc.communicate()[1]}")
            if line.startswith("child "):
                children.append(int(line.split()[1]))
            if line.strip() == "holding":
                return proc

    start.children = children  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def other_ids(first: int) -> Any:
    counter = itertools.count(first)
    return lambda batch: [next(counter) for _ in range(int(batch[0].shape[0]))]


def test_a_second_writer_is_refused_naming_the_first(tmp_path: Path, holder: Any) -> None:
    path = tmp_path / "store"
    writer = holder()
    case = mlp()
    with pytest.raises(StoreError, match="another writer") as info:
        log(case, batches(case, 4, first=10), path, ids=other_ids(100))
    assert f"pid {writer.pid} on host {socket.gethostname()}" in str(info.value)
    assert str(path) in str(info.value)
    assert hook_count(case.model) == 0
    reader = hookinf.GradientStore(path)  # readers take no lock
    assert set(reader.ids.tolist()) <= set(range(4))

    (tmp_path / "gate").touch()
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert sorted(hookinf.GradientStore(path).ids.tolist()) == list(range(16))  # the first writer lost nothing
    log(case, batches(case, 4, first=10), path, ids=other_ids(100))  # once it is done, the next writer proceeds
    assert sorted(hookinf.GradientStore(path).ids.tolist()) == [*range(16), *range(100, 116)]


@pytest.mark.parametrize("mode", ["plain", "fork"])
def test_a_killed_writer_does_not_leave_the_store_locked(tmp_path: Path, holder: Any, mode: str) -> None:
    path = tmp_path / "store"
    writer = holder(mode)
    writer.send_signal(signal.SIGKILL)
    writer.communicate(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    for child in holder.children:  # the killed writer's forked child lives on, holding a copy of its files
        os.kill(child, 0)
    case = mlp()
    log(case, batches(case, 4, first=10), path, ids=other_ids(100))
    store = hookinf.GradientStore(path)
    assert_whole_shards(store)
    ids = store.ids.tolist()
    assert set(range(100, 116)) <= set(ids) <= set(range(4)) | set(range(100, 116))


def test_a_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    case = mlp()
    twin = copy.deepcopy(case.model)
    path = tmp_path / "store"
    with hookinf.watch(case.model, log_to=path, compress=LOGRA, modules=case.modules) as w:
        w.tag(range(4))
        case.loss_fn(case.model, batches(case, 1)[0]).mean().backward()
        with pytest.raises(StoreError, match=f"pid {os.getpid()} "):
            hookinf.log(twin, batches(case, 1), case.loss_fn, compress=LOGRA, path=path, modules=case.modules)
    assert hookinf.GradientStore(path).ids.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------- 3. shard names
def test_a_resume_after_a_removed_shard_entry_never_overwrites_a_listed_shard(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 4)
    reference = log(case, train, tmp_path / "reference")
    path = tmp_path / "store"
    log(case, train[:3], path, flush_every=4)  # shard-000000 .. shard-000002: ids 0..11
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["file"] != "shard-000001.safetensors"]  # by hand
    (path / "manifest.json").write_text(json.dumps(manifest))
    kept = (path / "shard-000002.safetensors").read_bytes()

    log(case, train, path, flush_every=4)  # logs ids 4..7 and 12..15 again, into new shards
    store = hookinf.GradientStore(path)
    assert (path / "shard-000002.safetensors").read_bytes() == kept
    files = [s.file for s in store.shards]
    assert len(set(files)) == len(files) == 4
    assert set(files) >= {"shard-000000.safetensors", "shard-000002.safetensors"}
    assert "shard-000001.safetensors" not in files
    assert_whole_shards(store)
    assert_same_store(store, reference, SAME_TOL, "resumed after a manual recovery")


# ---------------------------------------------------------------------------------------------- 4. kills at renames
# A script fragment (needs os and signal): killed_at(name, k, job) runs job in a forked child whose k-th call of
# os.<name> kills it with SIGKILL, and says whether it was killed. test_retrieval_persistence.py's scripts use it too.
KILLED_AT = """
REAL = {"replace": os.replace, "unlink": os.unlink}

def killed_at(name, k, job):
    # forks; the child runs job with os.<name> killing it (SIGKILL) at the k-th call; True when it was killed
    pid = os.fork()
    if pid == 0:
        calls = [0]
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return REAL[name](*args, **kwargs)
        setattr(os, name, wrapper)
        try:
            job()
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
        raise RuntimeError(f"the child failed with status {os.WEXITSTATUS(status)}")
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
"""

KILLS = (
    """
root = sys.argv[1]
"""
    + KILLED_AT
    + """
old_scores = hookinf.Scores({"fc1": torch.zeros(2, 3), "fc2": torch.ones(2, 3)}, method="old", ids=torch.arange(3))
new_scores = hookinf.Scores({"fc1": torch.full((2, 3), 5.0), "fc2": torch.ones(2, 3)}, method="new",
                            ids=torch.tensor([7, 8, 9]))
old_curvature = hookinf.fit(case.model, train[:1], case.loss_fn, method="kfac", progress=False)
new_curvature = hookinf.fit(case.model, train[:3], case.loss_fn, method="kfac", progress=False)

out = {}
for what, old, new, call in (("scores", old_scores, new_scores, "replace"),
                             ("curvature", old_curvature, new_curvature, "replace"),
                             ("scores-cleanup", old_scores, new_scores, "unlink")):
    out[what] = []
    for k in range(1, 20):
        target = os.path.join(root, f"{what}-{k}")
        old.save(target)
        killed = killed_at(call, k, lambda: new.save(target))
        out[what].append([target, killed])
        if not killed:
            break
out["store"] = []
for k in range(1, 40):
    target = os.path.join(root, f"store-{k}")
    killed = killed_at("replace", k, lambda: hookinf.log(case.model, train[:3], case.loss_fn, compress=LOGRA,
                                                         path=target, modules=case.modules, flush_every=4,
                                                         progress=False))
    out["store"].append([target, killed])
    if not killed:
        break
print(json.dumps(out))
"""
)


@pytest.fixture(scope="module")
def kills(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, bool]]]:
    return run_script(KILLS, str(tmp_path_factory.mktemp("kills")))


def saved(scores: hookinf.Scores) -> tuple[str, list[int], dict[str, list[Any]]]:
    assert isinstance(scores.ids, torch.Tensor)
    return scores.method, scores.ids.tolist(), {name: part.tolist() for name, part in scores.per_layer.items()}


OLD_SCORES = ("old", [0, 1, 2], {"fc1": [[0.0] * 3] * 2, "fc2": [[1.0] * 3] * 2})
NEW_SCORES = ("new", [7, 8, 9], {"fc1": [[5.0] * 3] * 2, "fc2": [[1.0] * 3] * 2})


@pytest.mark.parametrize("what", ["scores", "scores-cleanup"])
def test_scores_save_killed_at_each_step_leaves_the_old_or_the_new_scores(
    kills: dict[str, list[tuple[str, bool]]], what: str
) -> None:
    runs = kills[what]
    assert [killed for _, killed in runs] == [True] * (len(runs) - 1) + [False], runs
    found = [saved(hookinf.load_scores(target)) for target, _ in runs]
    for (target, _), got in zip(runs, found, strict=True):
        assert got in (OLD_SCORES, NEW_SCORES), f"{target}: a mix of the old and new scores: {got}"
        hookinf.Scores({"fc1": torch.ones(1, 1)}, method="again").save(target)  # the next save clears what was left
        assert len(os.listdir(target)) == 2, os.listdir(target)  # the manifest and one tensor file
    assert found[-1] == NEW_SCORES
    if what == "scores":
        assert found[0] == OLD_SCORES
        assert len(runs) >= 3  # killed at the tensor file's and at the manifest's rename, then complete


def test_curvature_save_killed_at_each_rename_leaves_the_old_or_the_new_curvature(
    kills: dict[str, list[tuple[str, bool]]],
) -> None:
    runs = kills["curvature"]
    counts = [hookinf.load(target).num_examples for target, _ in runs]
    assert set(counts) <= {4, 12}, counts
    assert (counts[0], counts[-1]) == (4, 12)
    assert not runs[-1][1]


def test_logging_killed_at_each_rename_leaves_a_store_that_resumes(kills: dict[str, list[tuple[str, bool]]]) -> None:
    runs = kills["store"]
    assert len(runs) >= 7, runs  # the manifest's creation, then a shard and a manifest update per flush
    case = mlp()
    train = batches(case, 3)
    reference = log(case, train, Path(runs[0][0]).parent / "reference")
    for target, killed in runs:
        path = Path(target)
        if (path / "manifest.json").exists():
            store = hookinf.GradientStore(path)
            assert_whole_shards(store)
            assert set(store.ids.tolist()) <= set(range(12))
        resumed = log(case, train, path, flush_every=4)
        assert not temporaries(path), f"{target}: leftovers of the kill were not removed: {temporaries(path)}"
        assert_same_store(resumed, reference, SAME_TOL, f"{target} resumed ({'killed' if killed else 'complete'})")


# ------------------------------------------------------------------------------------------ 7. creation, leftovers
def test_a_logging_watch_creates_its_store_when_entered(tmp_path: Path) -> None:
    case = mlp()
    path = tmp_path / "store"
    w = hookinf.watch(case.model, log_to=path, compress=LOGRA, modules=case.modules)
    assert not path.exists(), "the store was created before the watch was entered"
    with w:
        assert (path / "manifest.json").is_file()
        w.tag(range(4))
        case.loss_fn(case.model, batches(case, 1)[0]).mean().backward()
    assert hookinf.GradientStore(path).ids.tolist() == [0, 1, 2, 3]


def test_leftovers_of_a_killed_writer_go_when_the_store_is_next_written(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 3)
    path = tmp_path / "store"
    log(case, train[:2], path, flush_every=4)
    leftovers = [".shard-000002.safetensors.k2j3h4.tmp", ".manifest.json.a8f7d6.tmp"]
    for name in leftovers:
        (path / name).write_bytes(b"\x00" * 37)
    (path / "notes.tmp").write_text("not ours")
    hookinf.GradientStore(path)  # a reader removes nothing
    assert temporaries(path) == sorted([*leftovers, "notes.tmp"])
    log(case, train, path, flush_every=4)
    assert temporaries(path) == ["notes.tmp"]
    assert sorted(hookinf.GradientStore(path).ids.tolist()) == list(range(12))


def test_a_failed_score_save_names_the_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should go")
    scores = hookinf.Scores({"fc1": torch.zeros(1, 2)}, method="m")
    with pytest.raises(HookinfError, match="cannot save the scores") as info:
        scores.save(blocker / "scores")
    assert str(blocker / "scores") in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    case = mlp()
    curvature = hookinf.fit(case.model, batches(case, 1), case.loss_fn, method="kfac", progress=False)
    with pytest.raises(hookinf.CurvatureError, match="cannot save") as caught:
        curvature.save(blocker / "curvature")
    assert str(blocker / "curvature") in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
