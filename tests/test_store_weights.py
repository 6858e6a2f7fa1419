"""A store knows the weights its gradients were taken at (issue: "a rerun silently reuses a stale store").

The checksum (``hookinf.weights.weights_hash``) is tested against its contract: equal for bit-identical weights in
another process with another thread count, different for a one-ulp change of one element, for two swapped rows and
for another dtype. The store's behaviour is tested end to end with real reruns: ``hookinf.log`` into a folder that
holds another run's gradients, ``watch(log_to=)`` around a real training loop (the weights move), the Trainer
callback run twice, and scoring a store with a model at other weights. Oracles: a fresh store logged into another
directory (``assert_same_store``) and the bytes of the refused store, unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ModelCase
from test_store import LOGRA, SAME_TOL, assert_same_store, batches, log, mlp, user_loop

import hookinf
from hookinf import HookinfWarning, StoreError
from hookinf.selection import select
from hookinf.weights import weights_hash


def nudge(case: ModelCase) -> None:
    """One SGD step on the first batch: the weights a rerun of training would end at."""
    optimizer = torch.optim.SGD(case.model.parameters(), lr=0.1)
    case.loss_fn(case.model, case.make_batch(1)).mean().backward()
    optimizer.step()
    case.model.zero_grad(set_to_none=True)


def tracked(case: ModelCase) -> list[torch.Tensor]:
    return select(case.model, case.modules).parameters()


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "writer.lock"}


# ---------------------------------------------------------------------------------------------------- the checksum


def test_weights_hash_is_exact_and_sensitive() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 70, generator=generator)
    bias = torch.randn(300, generator=generator)
    base = weights_hash([weight, bias])
    assert weights_hash([weight.clone(), bias.clone()]) == base
    assert weights_hash([weight.t().contiguous().t(), bias]) == base  # the values, not the memory layout

    one_ulp = weight.clone()
    one_ulp[123, 45] = torch.nextafter(one_ulp[123, 45], torch.tensor(float("inf")))
    assert weights_hash([one_ulp, bias]) != base
    swapped = weight.clone()
    swapped[[3, 200]] = swapped[[200, 3]]
    assert weights_hash([swapped, bias]) != base
    assert weights_hash([weight.double(), bias.double()]) != base
    assert weights_hash([weight.reshape(70, 300), bias]) != base
    assert weights_hash([bias, weight]) != base
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # every width reads its own bits
        low = weight.to(dtype)
        changed = low.clone()
        changed[0, 0] = torch.nextafter(changed[0, 0].float(), torch.tensor(1e9)).to(dtype)
        if bool(changed[0, 0] != low[0, 0]):
            assert weights_hash([changed]) != weights_hash([low])


def test_weights_hash_is_the_same_in_another_process_and_thread_count(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    params = [torch.randn(1000, 517, generator=generator), torch.randn(1000, generator=generator).bfloat16()]
    torch.save(params, tmp_path / "params.pt")
    script = (
        "import sys, torch; torch.set_num_threads(1); from hookinf.weights import weights_hash; "
        "print(weights_hash(torch.load(sys.argv[1], weights_only=True)))"
    )
    other = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "params.pt")], capture_output=True, text=True, check=True
    )
    assert other.stdout.strip() == weights_hash(params)


# ---------------------------------------------------------------------------------------------------- hookinf.log


def test_a_rerun_at_other_weights_is_refused_and_overwrite_replaces(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 3)
    path = tmp_path / "store"
    log(case, train, path)
    before = files(path)
    recorded = json.loads((path / "manifest.json").read_text())["weights"]
    assert recorded["hash"] == weights_hash(tracked(case))

    nudge(case)  # the rerun's model
    with pytest.raises(StoreError, match=r"another run took at other weights.*new path, or pass overwrite=True"):
        log(case, train, path)
    assert files(path) == before  # refused before anything was written

    replaced = log(case, train, path, overwrite=True)
    assert_same_store(replaced, log(case, train, tmp_path / "fresh"), SAME_TOL, "overwritten store vs a fresh one")
    assert sorted(p.name for p in path.glob("shard-*")) == [s.file for s in replaced.shards]  # the old shards are gone


def test_a_resume_at_the_same_weights_says_how_many_examples_it_skips(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 4)
    path = tmp_path / "store"
    log(case, train[:2], path)
    with pytest.warns(HookinfWarning, match=r"resuming a gradient store that holds 8 examples"):
        resumed = log(case, train, path)
    assert_same_store(resumed, log(case, train, tmp_path / "reference"), SAME_TOL, "resumed store")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log(case, train, tmp_path / "new")  # a new store says nothing


def test_scoring_a_store_with_a_model_at_other_weights_is_refused(tmp_path: Path) -> None:
    case = mlp()
    train, query = batches(case, 3), batches(case, 1, first=9)
    store = log(case, train, tmp_path / "store")
    kwargs = {"modules": case.modules, "progress": False}
    at_logging = hookinf.influence(case.model, store, query, case.loss_fn, method="exact", **kwargs)
    from_store = hookinf.fit(case.model, store, case.loss_fn, method="exact", **kwargs)  # at the store's weights
    from_data = hookinf.fit(case.model, train, case.loss_fn, method="exact", compress=LOGRA, **kwargs)
    for key, tensor in from_data.tensors.items():  # the same statistics, from stored or recomputed gradients
        torch.testing.assert_close(from_store.tensors[key], tensor, rtol=SAME_TOL, atol=SAME_TOL)
    nudge(case)
    message = r"taken at other weights .* Score with the model the store was logged from"
    with pytest.raises(StoreError, match=message):
        hookinf.influence(case.model, store, query, case.loss_fn, method="exact", **kwargs)
    with pytest.raises(StoreError, match=message):
        hookinf.self_influence(case.model, store, case.loss_fn, method="identity", **kwargs)
    with pytest.raises(StoreError, match=message):
        hookinf.fit(case.model, store, case.loss_fn, method="exact", **kwargs)
    assert at_logging.shape == (4, 12)


def test_a_store_written_before_weights_were_recorded_is_not_checked(tmp_path: Path) -> None:
    case = mlp()
    train, query = batches(case, 2), batches(case, 1, first=9)
    path = tmp_path / "store"
    log(case, train, path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["weights"]  # an older hookinf's manifest (the field is outside the sealed configuration)
    (path / "manifest.json").write_text(json.dumps(manifest))
    nudge(case)
    store = hookinf.GradientStore(path)
    assert store.manifest.weights is None
    hookinf.influence(case.model, store, query, case.loss_fn, method="exact", modules=case.modules, progress=False)
    log(case, batches(case, 3), path)  # resumes: its weights are unknown, and stay so
    assert hookinf.GradientStore(path).manifest.weights is None


# ---------------------------------------------------------------------------------------------------- watch(log_to=)


def test_a_store_logged_while_training_records_the_weights_it_ended_at(tmp_path: Path) -> None:
    case = mlp()
    train, query = batches(case, 3), batches(case, 1, first=9)
    path = tmp_path / "store"
    optimizer = torch.optim.SGD(case.model.parameters(), lr=0.5)
    w = hookinf.watch(case.model, log_to=path, compress=LOGRA, modules=case.modules, flush_every=4)
    with w:
        user_loop(w, case, train[:2], optimizer)  # the weights move at every step
    assert hookinf.GradientStore(path).manifest.weights.hash == weights_hash(tracked(case))
    hookinf.influence(case.model, w.store, query, case.loss_fn, method="exact", modules=case.modules, progress=False)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same watch resumes its own store: no warning, no refusal
        with w:
            w.tag(range(8, 12))
            optimizer.zero_grad()
            case.loss_fn(case.model, train[2]).mean().backward()
            optimizer.step()
    assert sorted(hookinf.GradientStore(path).ids.tolist()) == list(range(12))

    nudge(case)  # a rerun of the training script, in the same folder
    rerun = hookinf.watch(case.model, log_to=path, compress=LOGRA, modules=case.modules)
    with pytest.raises(StoreError, match="overwrite=True"), rerun:
        pass
    assert sorted(hookinf.GradientStore(path).ids.tolist()) == list(range(12))
    with pytest.raises(StoreError, match="taken at other weights"):
        hookinf.influence(case.model, path_store(path), query, case.loss_fn, method="exact", modules=case.modules)

    replacing = hookinf.watch(case.model, log_to=path, compress=LOGRA, modules=case.modules, overwrite=True)
    with replacing:
        user_loop(replacing, case, train[:1], optimizer)
    assert hookinf.GradientStore(path).ids.tolist() == [0, 1, 2, 3]


def path_store(path: Path) -> hookinf.GradientStore:
    return hookinf.GradientStore(path)
