"""Damaged and edited saves are refused, naming the file; saves from before checksums still load.

Each case damages a real save the way disks, copies and hands do: a flipped byte in a tensor file, an edited count,
shape, method or name in a manifest, a shard listed twice or named outside the directory. Curvatures and scores are
checked in full when loaded; a gradient store's sizes and headers when it opens, its checksums by ``verify()`` and
``hookinf info --verify``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from test_store import batches, log, mlp

import hookinf
from hookinf import CurvatureError, HookinfError, StoreError
from hookinf.cli import main


def flip_last_byte(path: Path) -> None:
    """Flips the file's last byte: tensor data (the header comes first), so the file still parses."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def strip_checksums(manifest: dict[str, Any]) -> None:
    """What a manifest written before checksums looked like."""
    for key in ("config_sha256", "manifest_sha256", "tensors_size", "tensors_sha256"):
        manifest.pop(key, None)
    for shard in manifest.get("shards", []):
        shard.pop("size", None)
        shard.pop("sha256", None)


# ---------------------------------------------------------------------------------------------------- gradient stores
@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    case = mlp()
    log(case, batches(case, 3), tmp_path / "store", flush_every=4)
    return tmp_path / "store"


def test_a_flipped_byte_in_a_shard_is_found_by_verify_and_the_cli(
    store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check = hookinf.GradientStore(store_path).verify()
    assert (check.shards, check.examples, check.checksummed, check.unlisted) == (3, 12, 3, ())
    (store_path / "shard-000009.safetensors").write_bytes(b"left by a kill")
    assert main(["info", "--verify", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert "3 shards read in full" in out
    assert "3 SHA-256 checksums match" in out
    assert "shard-000009.safetensors" in out  # listed as not part of the store
    shard = store_path / "shard-000001.safetensors"
    flip_last_byte(shard)
    store = hookinf.GradientStore(store_path)  # same size, same header: opening does not read the data
    with pytest.raises(StoreError, match="SHA-256 differs") as info:
        store.verify()
    assert str(shard) in str(info.value)
    assert main(["info", str(store_path)]) == 0
    assert main(["info", "--verify", str(store_path)]) == 1
    assert str(shard) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["shards"].append(m["shards"][0]), "listed twice"),
        (lambda m: m["shards"][0].update(file="../elsewhere/shard-000000.safetensors"), "not a plain"),
        (lambda m: m["shards"][0].update(file="manifest.json"), "not a plain"),
        (lambda m: m["shards"][1].update(count=5), "shard-000001.safetensors: unreadable shard .*5 bytes|implies"),
        (lambda m: m["layers"]["fc1"].update({"out": 4}), "config_sha256"),
        (lambda m: m["compressor"].update(r_in=4), "config_sha256"),
        (lambda m: m.update(dtype="float32"), "config_sha256"),
        (lambda m: m.update(ids="str"), "__ids_utf8__"),
    ],
    ids=["listed-twice", "outside", "not-a-shard", "count", "dims", "compressor", "dtype", "id-kind"],
)
def test_an_edited_store_manifest_is_refused_naming_the_file(
    store_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit(store_path / "manifest.json", change)
    with pytest.raises(StoreError, match=message) as info:
        hookinf.GradientStore(store_path)
    assert str(store_path) in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["shards"][1].update(count=5), r"shard-000001\.safetensors: tensor '.*' is .* \[4.*implies .*5"),
        (lambda m: m["layers"]["fc2"].update({"out": 1}), r"shard-000000\.safetensors: tensor 'fc2'"),
    ],
    ids=["count", "dims"],
)
def test_an_edit_of_an_old_manifest_is_refused_by_the_shard_headers(
    store_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit(store_path / "manifest.json", lambda m: (strip_checksums(m), change(m)))  # no checksum to catch it
    with pytest.raises(StoreError, match=message):
        hookinf.GradientStore(store_path)


def test_a_store_written_before_checksums_opens_resumes_and_verifies(store_path: Path) -> None:
    edit(store_path / "manifest.json", strip_checksums)
    store = hookinf.GradientStore(store_path)
    check = store.verify()
    assert (check.shards, check.examples, check.checksummed) == (3, 12, 0)
    case = mlp()
    log(case, batches(case, 4), store_path, flush_every=4)
    resumed = hookinf.GradientStore(store_path)
    assert sorted(resumed.ids.tolist()) == list(range(16))
    assert [s.sha256 is not None for s in resumed.shards] == [False, False, False, True]
    assert resumed.verify().checksummed == 1


def test_verify_reports_shard_files_the_manifest_does_not_list(store_path: Path) -> None:
    (store_path / "shard-000009.safetensors").write_bytes(b"left by a kill")
    assert hookinf.GradientStore(store_path).verify().unlisted == ("shard-000009.safetensors",)


# ---------------------------------------------------------------------------------------------------- scores
@pytest.fixture
def scores_dir(tmp_path: Path) -> Path:
    scores = hookinf.Scores(
        {"fc1": torch.arange(6.0).reshape(2, 3), "fc2": torch.ones(2, 3)}, method="exact", ids=torch.tensor([4, 2, 9])
    )
    return scores.save(tmp_path / "scores")


def tensor_file(directory: Path) -> Path:
    return directory / json.loads((directory / "manifest.json").read_text())["tensors"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: flip_last_byte(tensor_file(d)), "scores-.*SHA-256 differs"),
        (lambda d: edit(d / "manifest.json", lambda m: m.update(method="identity")), "manifest_sha256"),
        (lambda d: edit(d / "manifest.json", lambda m: m.update(shape=[2, 2])), "manifest_sha256"),
        (lambda d: edit(d / "manifest.json", lambda m: m.update(tensors="../x.safetensors")), "manifest_sha256"),
        (lambda d: tensor_file(d).unlink(), "No such file"),
    ],
    ids=["flipped-byte", "method", "shape", "outside", "missing"],
)
def test_damaged_or_edited_scores_are_refused_naming_the_file(
    scores_dir: Path, damage: Callable[[Path], None], message: str
) -> None:
    damage(scores_dir)
    with pytest.raises(HookinfError, match=message) as info:
        hookinf.load_scores(scores_dir)
    assert str(scores_dir) in str(info.value)
    assert main(["info", "--verify", str(scores_dir)]) == 1


def write_version_1_scores(directory: Path, **manifest: Any) -> None:
    """Scores as hookinf saved them before checksums: ``scores.safetensors`` and a version 1 manifest."""
    directory.mkdir()
    save_file({"layer/fc1": torch.ones(2, 3), "ids": torch.tensor([5, 6, 7])}, str(directory / "scores.safetensors"))
    fields = {"format": "hookinf.scores", "version": 1, "method": "exact", "layers": ["fc1"], "damping": {}}
    fields.update({"shape": [2, 3], "per_token": False, "ids": True, **manifest})
    (directory / "manifest.json").write_text(json.dumps(fields))


def test_scores_saved_before_checksums_load_and_a_new_save_replaces_them(tmp_path: Path) -> None:
    write_version_1_scores(tmp_path / "v1")
    loaded = hookinf.load_scores(tmp_path / "v1")
    assert loaded.method == "exact"
    assert loaded.ids is not None
    assert loaded.ids.tolist() == [5, 6, 7]
    loaded.save(tmp_path / "v1")
    assert not (tmp_path / "v1" / "scores.safetensors").exists()
    assert len(list((tmp_path / "v1").iterdir())) == 2
    assert hookinf.load_scores(tmp_path / "v1").ids.tolist() == [5, 6, 7]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"tensors": "../scores.safetensors"}, "not a plain file name"),
        ({"shape": [2, 2]}, re.escape("not [2, 2] as the manifest says")),
        ({"layers": ["fc1", "fc2"]}, "layer/fc2"),
        ({"ids": False}, "does not list"),
    ],
    ids=["outside", "shape", "layers", "unlisted-tensor"],
)
def test_an_edited_version_1_manifest_is_refused(tmp_path: Path, manifest: dict[str, Any], message: str) -> None:
    write_version_1_scores(tmp_path / "v1", **manifest)
    with pytest.raises(HookinfError, match=message):
        hookinf.load_scores(tmp_path / "v1")


# ---------------------------------------------------------------------------------------------------- curvatures
@pytest.fixture
def curvature_dir(tmp_path: Path) -> Path:
    case = mlp()
    return hookinf.fit(case.model, batches(case, 2), case.loss_fn, method="ekfac", progress=False).save(tmp_path / "c")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: flip_last_byte(tensor_file(d)), "SHA-256 differs"),
        (lambda d: edit(d / "manifest.json", lambda m: m.update(num_examples=80)), "manifest_sha256"),
        (lambda d: edit(d / "manifest.json", lambda m: m.update(method="kfac")), "manifest_sha256"),
        (lambda d: edit(d / "manifest.json", strip_checksums) or flip_last_byte(tensor_file(d)), "hash in the file's"),
    ],
    ids=["flipped-byte", "num-examples", "method", "old-manifest-flipped-byte"],
)
def test_a_damaged_or_edited_curvature_is_refused_naming_the_file(
    curvature_dir: Path, damage: Callable[[Path], None], message: str
) -> None:
    damage(curvature_dir)
    with pytest.raises(CurvatureError, match=message) as info:
        hookinf.load(curvature_dir)
    assert str(curvature_dir) in str(info.value)


def test_a_curvature_saved_before_checksums_loads(curvature_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = hookinf.load(curvature_dir)
    edit(curvature_dir / "manifest.json", strip_checksums)
    after = hookinf.load(curvature_dir)
    assert after.num_examples == before.num_examples
    for key, value in before.tensors.items():
        assert torch.equal(after.tensors[key], value), key
    assert main(["info", "--verify", str(curvature_dir)]) == 0
    assert "saved before checksums" in capsys.readouterr().out
