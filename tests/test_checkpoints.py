"""``checkpoints=`` in ``hookinf.fit`` / ``hookinf.influence``, checkpoint sources, restoring the model, snapshots.

References are brute force: each checkpoint loaded by hand into a deep copy of the model (``load_state_dict``) and
scored with the plain helper; the checkpointed call must give the same numbers bit for bit (same float64 model,
same passes), and the combination must be the documented weighted sum of those.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

import hookinf
from hookinf import CheckpointError, CheckpointScores, ConfigurationError, Snapshots, saved_snapshots
from hookinf.checkpoint_scores import CheckpointSelfScores, combine_scores
from hookinf.checkpoints import read_checkpoint
from hookinf.loaded_checkpoint import LoadedCheckpoint

pytestmark = pytest.mark.filterwarnings("ignore:hookinf tracks 2 layer:hookinf.HookinfWarning")  # the BatchNorm

F64 = torch.float64
Batch = tuple[Tensor, Tensor]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(4, 6), norm=nn.BatchNorm1d(6), act=nn.Tanh(), drop=nn.Dropout(0.2), fc2=nn.Linear(6, 3)
        )
    ).to(F64)


def loss_fn(model: Callable[..., Tensor], batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.fixture
def data() -> tuple[list[Batch], list[Batch]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (12,), generator=gen)
    return [(x[:6], y[:6]), (x[6:], y[6:])], [(x[:3] + 0.5, y[:3])]


def trained_checkpoints(model: nn.Module, train: list[Batch], count: int = 3) -> list[dict[str, Tensor]]:
    """Full state dicts after each of ``count`` SGD epochs of a copy of ``model`` (BatchNorm statistics move too)."""
    trainee = copy.deepcopy(model)
    opt = torch.optim.SGD(trainee.parameters(), lr=0.3)
    states = []
    for _ in range(count):
        trainee.train()
        for batch in train:
            opt.zero_grad()
            loss_fn(trainee, batch).mean().backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in trainee.state_dict().items()})
    return states


def state_bits(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: Mapping[str, Tensor], modes: list[bool], flags: list[bool]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        assert torch.equal(after[name], value), name
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags


def at(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A deep copy of ``model`` with ``state`` loaded by hand (strict=False: partial checkpoints)."""
    other = copy.deepcopy(model)
    other.load_state_dict(dict(state), strict=False)
    return other


# ---------------------------------------------------------------------------------------------------- influence
@pytest.mark.parametrize("combine", ["normalized", "sum", [0.5, -2.0, 3.0]], ids=["normalized", "sum", "weights"])
def test_influence_over_checkpoints_is_the_combination_of_each(data: Any, combine: Any) -> None:
    train, query = data
    model = make_model()
    states = trained_checkpoints(model, train)
    scores = hookinf.influence(
        model, train, query, loss_fn, method="exact", checkpoints=states, combine=combine, progress=False
    )
    assert isinstance(scores, CheckpointScores)
    manual = [hookinf.influence(at(model, s), train, query, loss_fn, method="exact", progress=False) for s in states]
    for got, want in zip(scores.per_checkpoint, manual, strict=True):
        for name in want.layers:
            assert torch.equal(got.per_layer[name], want.per_layer[name]), name
    if combine == "sum":
        weights = [1.0, 1.0, 1.0]
    elif combine == "normalized":
        weights = [1.0 / float(m.total.double().std(correction=0)) for m in manual]
    else:
        weights = combine
    assert scores.weights == pytest.approx(weights, rel=1e-12)
    for name in scores.layers:
        expected = sum(w * m.per_layer[name] for w, m in zip(weights, manual, strict=True))
        torch.testing.assert_close(scores.per_layer[name], expected, rtol=1e-12, atol=0)
        contributions = sum(scores.contribution(k).per_layer[name] for k in range(3))
        torch.testing.assert_close(contributions, scores.per_layer[name], rtol=1e-12, atol=0)
    torch.testing.assert_close(scores.total, sum(scores.per_layer.values()), rtol=1e-12, atol=0)
    assert "3 checkpoints combined" in repr(scores)


def test_fit_returns_one_curvature_per_checkpoint_and_they_are_reused(data: Any) -> None:
    train, query = data
    model = make_model()
    states = trained_checkpoints(model, train, count=2)
    curvatures = hookinf.fit(model, train, loss_fn, method="ekfac", checkpoints=states, progress=False)
    assert isinstance(curvatures, list)
    assert len(curvatures) == 2
    probe = torch.randn(5, 3, 7, dtype=F64)  # gradients of fc2 (3 × 6, plus the bias column)
    for curvature, state in zip(curvatures, states, strict=True):
        manual = hookinf.fit(at(model, state), train, loss_fn, method="ekfac", progress=False)
        torch.testing.assert_close(curvature.apply("fc2", probe), manual.apply("fc2", probe), rtol=1e-12, atol=0)

    calls = []

    def counting(model: Callable[..., Tensor], batch: Batch) -> Tensor:
        calls.append(len(batch[0]))
        return loss_fn(model, batch)

    reused = hookinf.influence(model, train, query, counting, method=curvatures, checkpoints=states, progress=False)
    assert sum(calls) == 2 * (12 + 3)  # per checkpoint: the queries and one scoring pass; no fit pass
    calls.clear()
    refit = hookinf.influence(model, train, query, counting, method="ekfac", checkpoints=states, progress=False)
    assert sum(calls) > 2 * (12 + 3)
    assert isinstance(reused, CheckpointScores)
    assert isinstance(refit, CheckpointScores)
    torch.testing.assert_close(reused.total, refit.total, rtol=1e-10, atol=0)


def test_partial_checkpoints_and_per_token_parts(data: Any) -> None:
    """A checkpoint of only the tracked parameters; per-token parts combine like the per-layer ones."""
    train, query = data
    model = make_model()
    full = trained_checkpoints(model, train, count=2)
    partial = [{k: v for k, v in s.items() if k.startswith("fc2.")} for s in full]
    scores = hookinf.influence(
        model, train, query, loss_fn, modules=["fc2"], checkpoints=partial, per_token=True, progress=False
    )
    assert isinstance(scores, CheckpointScores)
    assert scores.per_token is not None
    manual = hookinf.influence(at(model, partial[1]), train, query, loss_fn, modules=["fc2"], progress=False)
    assert torch.equal(scores.per_checkpoint[1].per_layer["fc2"], manual.per_layer["fc2"])
    torch.testing.assert_close(scores.per_token["fc2"].sum(dim=2), scores.per_layer["fc2"], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------------- restoring
def test_model_restored_exactly_after_success_and_after_an_error(data: Any) -> None:
    train, query = data
    model = make_model()
    model.train()
    model.fc1.bias.requires_grad_(False)  # a frozen parameter stays frozen; untracked ones keep their values
    states = trained_checkpoints(model, train)
    params = [id(p) for p in model.parameters()]
    before, modes, flags = (
        state_bits(model),
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )
    hookinf.influence(model, train, query, loss_fn, method="exact", checkpoints=states, progress=False)
    assert_unchanged(model, before, modes, flags)

    seen = []

    def failing(inner: nn.Module, batch: Batch) -> Tensor:
        seen.append(float(inner.fc2.weight[0, 0].detach()))
        if len(seen) == 7:  # the second checkpoint's fit pass (each checkpoint: fit 2 batches, query 1, scores 2)
            model.eval()
            model.fc2.weight.requires_grad_(False)
            with torch.no_grad():
                model.fc1.weight.mul_(7.0)
            raise RuntimeError("boom")
        return loss_fn(inner, batch)

    with pytest.raises(RuntimeError, match="boom"):
        hookinf.influence(model, train, query, failing, method="exact", checkpoints=states, progress=False)
    assert seen[0] == float(states[0]["fc2.weight"][0, 0])
    assert seen[-1] == float(states[1]["fc2.weight"][0, 0])
    assert_unchanged(model, before, modes, flags)
    assert [id(p) for p in model.parameters()] == params  # loaded in place: the same parameter objects


def test_loaded_checkpoint_copies_only_what_it_overwrites_and_converts_dtype() -> None:
    model = make_model()
    before = state_bits(model)
    state = {"fc2.bias": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)}
    block = LoadedCheckpoint(model, state, what="test")
    with block:
        assert model.fc2.bias.dtype == F64
        assert model.fc2.bias.tolist() == [1.0, 2.0, 3.0]
        assert [id(t) for t, _ in block._kept.values()] == [id(model.fc2.bias)]
    assert_unchanged(model, before, [m.training for m in model.modules()], [True] * 6)


# ---------------------------------------------------------------------------------------------------- sources
def _torch_file(tmp: Path, state: dict[str, Tensor]) -> Any:
    torch.save(state, tmp / "ckpt.pt")
    return tmp / "ckpt.pt"


def _safetensors_file(tmp: Path, state: dict[str, Tensor]) -> Any:
    save_file(state, str(tmp / "weights.safetensors"))
    return str(tmp / "weights.safetensors")


def _hf_directory(tmp: Path, state: dict[str, Tensor]) -> Any:
    (tmp / "checkpoint-10").mkdir()
    save_file(state, str(tmp / "checkpoint-10" / "model.safetensors"), metadata={"format": "pt"})
    return tmp / "checkpoint-10"


def _hf_bin_directory(tmp: Path, state: dict[str, Tensor]) -> Any:
    (tmp / "checkpoint-10").mkdir()
    torch.save(state, tmp / "checkpoint-10" / "pytorch_model.bin")
    return tmp / "checkpoint-10"


def _sharded(tmp: Path, state: dict[str, Tensor], binary: bool) -> Any:
    names = sorted(state)
    suffix = "bin" if binary else "safetensors"
    shards = {f"model-00001-of-00002.{suffix}": names[::2], f"model-00002-of-00002.{suffix}": names[1::2]}
    for file, keys in shards.items():
        if binary:
            torch.save({k: state[k] for k in keys}, tmp / file)
        else:
            save_file({k: state[k] for k in keys}, str(tmp / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    index = "pytorch_model.bin.index.json" if binary else "model.safetensors.index.json"
    (tmp / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp


SOURCES = {
    "dict": lambda tmp, state: state,
    "torch-save": _torch_file,
    "safetensors": _safetensors_file,
    "hf-model-safetensors": _hf_directory,
    "hf-pytorch-model-bin": _hf_bin_directory,
    "hf-sharded-safetensors": lambda tmp, state: _sharded(tmp, state, binary=False),
    "hf-sharded-bin": lambda tmp, state: _sharded(tmp, state, binary=True),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_source_kind_reads_the_same_tensors_and_scores_the_same(tmp_path: Path, data: Any, kind: str) -> None:
    train, query = data
    model = make_model()
    state = {k: v.contiguous() for k, v in trained_checkpoints(model, train, count=1)[0].items()}
    source = SOURCES[kind](tmp_path, state)
    read = read_checkpoint(source, model, "test")
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], state[k]) for k in state)
    scores = hookinf.influence(model, train, query, loss_fn, method="exact", checkpoints=[source], progress=False)
    manual = hookinf.influence(at(model, state), train, query, loss_fn, method="exact", progress=False)
    assert torch.equal(scores.per_checkpoint[0].total, manual.total)  # type: ignore[attr-defined]


def test_peft_adapter_directory_maps_peft_names(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 6), act=nn.Tanh(), fc2=nn.Linear(6, 3))).to(F64)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    trained = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    model.save_pretrained(tmp_path / "checkpoint-3")
    assert (tmp_path / "checkpoint-3" / "adapter_model.safetensors").is_file()
    saved = set(peft.get_peft_model_state_dict(model))
    assert saved
    assert not saved & set(trained)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(-3.0)
    before = state_bits(model)
    read = read_checkpoint(tmp_path / "checkpoint-3", model, "test")
    assert read.keys() == trained.keys()
    assert all(torch.equal(read[k].to(F64), trained[k]) for k in trained)
    assert_unchanged(
        model, before, [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]
    )
    x = torch.randn(5, 4, dtype=F64)
    batches = [(x, torch.tensor([0, 1, 2, 0, 1]))]
    scores = hookinf.influence(
        model, batches, batches, loss_fn, checkpoints=[tmp_path / "checkpoint-3"], progress=False
    )
    manual = hookinf.influence(at(model, trained), batches, batches, loss_fn, progress=False)
    torch.testing.assert_close(scores.per_checkpoint[0].total, manual.total, rtol=1e-12, atol=0)  # type: ignore[attr-defined]
    assert_unchanged(
        model, before, [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]
    )


# ---------------------------------------------------------------------------------------------------- errors
def test_checkpoint_errors_name_the_checkpoint_and_leave_the_model_alone(tmp_path: Path, data: Any) -> None:
    train, query = data
    model = make_model()
    good = trained_checkpoints(model, train, count=1)[0]
    before = state_bits(model)

    def run(checkpoints: Any, **options: Any) -> Any:
        return hookinf.influence(model, train, query, loss_fn, checkpoints=checkpoints, progress=False, **options)

    with pytest.raises(CheckpointError, match=r"checkpoints\[1\].*'fc3.weight'"):
        run([good, {**good, "fc3.weight": torch.zeros(2)}])
    with pytest.raises(CheckpointError, match=r"'fc2.weight': \[3, 5\] in the checkpoint, \[3, 6\] in the model"):
        run([{**good, "fc2.weight": torch.zeros(3, 5, dtype=F64)}])
    with pytest.raises(CheckpointError, match=r"no value for 1 tracked parameter\(s\): 'fc1.weight'"):
        run([{k: v for k, v in good.items() if k != "fc1.weight"}])
    with pytest.raises(CheckpointError, match=r"checkpoints\[0\].*no such file"):
        run([tmp_path / "missing.pt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="a directory with none of"):
        run([tmp_path / "empty"])
    torch.save({"model": good, "step": 3}, tmp_path / "nested.pt")
    with pytest.raises(CheckpointError, match="nested dict under 'model'"):
        run([tmp_path / "nested.pt"])
    torch.save({"fc1.weight": object()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        run([tmp_path / "pickled.pt"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        run([tmp_path / "bad.safetensors"])
    with pytest.raises(ConfigurationError, match="wrap a single checkpoint in a list"):
        run(good)
    with pytest.raises(ConfigurationError, match="is empty"):
        run([])
    with pytest.raises(ConfigurationError, match="one of"):
        run([good], combine="mean")
    calls = []

    def counting(model: Callable[..., Tensor], batch: Batch) -> Tensor:
        calls.append(1)
        return loss_fn(model, batch)

    with pytest.raises(ConfigurationError, match="2 weights for 1 checkpoints"):  # before any pass runs
        hookinf.influence(model, train, query, counting, checkpoints=[good], combine=[1.0, 2.0], progress=False)
    with pytest.raises(ConfigurationError, match="finite"):
        hookinf.influence(model, train, query, counting, checkpoints=[good], combine=[float("nan")], progress=False)
    assert not calls
    curvature = hookinf.fit(model, train, loss_fn, method="kfac", progress=False)
    with pytest.raises(ConfigurationError, match="give checkpoints"):
        hookinf.influence(model, train, query, loss_fn, method=[curvature], progress=False)
    with pytest.raises(ConfigurationError, match="lists 1 curvatures for 2 checkpoints"):
        run([good, good], method=[curvature])
    with pytest.raises(ConfigurationError, match=r"method\[0\] is a str"):
        run([good], method=["kfac"])
    assert_unchanged(model, before, [m.training for m in model.modules()], [True] * 6)


def test_a_store_as_train_is_refused(tmp_path: Path, data: Any) -> None:
    train, query = data
    model = make_model()
    store = hookinf.log(model, train, loss_fn, compress=hookinf.LoGra(2, 2), path=tmp_path / "store", progress=False)
    with pytest.raises(ConfigurationError, match="GradientStore as train"):
        hookinf.influence(model, store, query, loss_fn, checkpoints=[model.state_dict()], progress=False)


def test_combined_scores_save_as_plain_scores(tmp_path: Path, data: Any) -> None:
    train, query = data
    model = make_model()
    scores = hookinf.influence(
        model, train, query, loss_fn, checkpoints=trained_checkpoints(model, train, 2), progress=False
    )
    loaded = hookinf.load_scores(scores.save(tmp_path / "scores"))
    assert type(loaded) is hookinf.Scores
    assert torch.equal(loaded.total, scores.total)


def test_normalized_gives_constant_scores_no_weight() -> None:
    flat = hookinf.Scores({"a": torch.full((2, 3), 4.0, dtype=F64)}, "exact")
    spread = hookinf.Scores({"a": torch.arange(6, dtype=F64).reshape(2, 3)}, "exact")
    combined = combine_scores([flat, spread], "normalized")
    assert combined.weights == (0.0, pytest.approx(1 / float(spread.total.std(correction=0))))


# ---------------------------------------------------------------------------------------------------- snapshots
@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
def test_snapshots_round_trip_from_a_watched_loop(tmp_path: Path, data: Any, to_disk: bool) -> None:
    train, query = data
    model = make_model()
    model.fc1.requires_grad_(False)  # frozen: not snapshotted
    snaps = Snapshots(model, every=2, to=tmp_path / "snaps" if to_disk else None)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    expected: dict[int, dict[str, Tensor]] = {}
    with hookinf.watch(model, fit="kfac", modules=["fc2"]) as watch:
        for step in range(1, 6):
            model.train()
            opt.zero_grad()
            loss_fn(model, train[step % 2]).mean().backward()
            opt.step()
            if snaps.take(step):
                expected[step] = state_bits(model)
        snaps.take(5, force=True)
        expected[5] = state_bits(model)
    assert watch.curvature() is not None
    assert snaps.steps == [2, 4, 5]
    assert not snaps.take(4, force=True)
    sources = snaps.checkpoints
    if to_disk:
        assert sources == saved_snapshots(tmp_path / "snaps")
        assert [Path(s).name for s in sources] == [f"step-0000000{k}.safetensors" for k in (2, 4, 5)]  # type: ignore[arg-type]
    for step, source in zip((2, 4, 5), sources, strict=True):
        read = read_checkpoint(source, model, "snapshot")
        assert "fc1.weight" not in read
        assert "fc1.bias" not in read
        assert {"norm.running_mean", "norm.num_batches_tracked", "fc2.weight"} <= set(read)
        assert all(torch.equal(value, expected[step][name]) for name, value in read.items())
    model.fc1.requires_grad_(True)
    with pytest.raises(CheckpointError, match=r"'fc1\.weight'"):  # now tracked, and not in the snapshots
        hookinf.influence(model, train, query, loss_fn, checkpoints=sources, progress=False)
    scores = hookinf.influence(model, train, query, loss_fn, modules=["fc2"], checkpoints=sources, progress=False)
    assert len(scores.per_checkpoint) == 3  # type: ignore[attr-defined]


def test_snapshot_options_are_checked() -> None:
    model = make_model()
    with pytest.raises(ConfigurationError, match=r"every= .* or at="):
        Snapshots(model)
    with pytest.raises(ConfigurationError, match="positive integer"):
        Snapshots(model, every=0)
    snaps = Snapshots(model, at=[0, 3])
    assert snaps.take(0)
    assert not snaps.take(2)
    assert snaps.take(3)
    assert len(snaps) == 2
    with pytest.raises(ConfigurationError, match="non-negative integer"):
        snaps.take(-1)


# ---------------------------------------------------------------------------------------------------- Trainer
class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.fc2(torch.tanh(self.fc1(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def test_trainer_snapshots_and_its_own_checkpoints_are_sources(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from hookinf.integrations import HookinfCallback, ModelLoss

    with pytest.raises(ConfigurationError, match="give snapshot_every="):
        HookinfCallback(fit="kfac", snapshots_to=tmp_path / "snaps")
    torch.manual_seed(0)
    model = TinyClassifier()
    gen = torch.Generator().manual_seed(2)
    rows = [{"x": torch.randn(4, generator=gen), "labels": int(i % 3)} for i in range(10)]
    callback = HookinfCallback(snapshot_every=3, snapshots_to=tmp_path / "snaps")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    assert callback.snapshots is not None
    assert callback.snapshots.steps == [3, 6]
    paths = saved_snapshots(tmp_path / "snaps")
    assert [p.name for p in paths] == ["step-00000003.safetensors", "step-00000006.safetensors"]
    for step, path in zip((3, 6), paths, strict=True):
        ours = read_checkpoint(path, model, "snapshot")
        theirs = read_checkpoint(tmp_path / "run" / f"checkpoint-{step}", model, "trainer")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    batches = [{"x": torch.stack([r["x"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}]
    scores = hookinf.influence(model, batches, batches, ModelLoss(), checkpoints=paths, progress=False)
    assert scores.shape == (10, 10)


# ---------------------------------------------------------------------------------------------------- self-influence
@pytest.mark.parametrize("combine", ["normalized", "sum", [0.5, -2.0, 3.0]], ids=["normalized", "sum", "weights"])
def test_self_influence_over_checkpoints_is_the_combination_of_each(data: Any, combine: Any) -> None:
    train, _ = data
    model = make_model()
    states = trained_checkpoints(model, train)
    before, modes = state_bits(model), [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    combined = hookinf.self_influence(
        model, train, loss_fn, method="exact", checkpoints=states, combine=combine, progress=False
    )
    assert isinstance(combined, CheckpointSelfScores)
    assert_unchanged(model, before, modes, flags)
    manual = [hookinf.self_influence(at(model, s), train, loss_fn, method="exact", progress=False) for s in states]
    for got, want in zip(combined.per_checkpoint, manual, strict=True):
        for name in want.layers:
            assert torch.equal(got.per_layer[name], want.per_layer[name]), name
    spreads = [float(m.total.std(correction=0)) for m in manual]
    rules = {"sum": [1.0] * 3, "normalized": [1 / s for s in spreads]}
    weights = rules[combine] if isinstance(combine, str) else combine
    assert combined.weights == pytest.approx(weights, rel=1e-12)
    for name in combined.layers:
        expected = sum(w * m.per_layer[name] for w, m in zip(weights, manual, strict=True))
        torch.testing.assert_close(combined.per_layer[name], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(combined.total, sum(combined.per_layer.values()), rtol=1e-12, atol=0)
    assert combined.topk(2).indices.tolist() == combined.total.topk(2).indices.tolist()


# ---------------------------------------------------------------------------------------------------- a store each
def test_one_store_per_checkpoint_scores_like_the_data_and_refuses_another_checkpoint(
    data: Any, tmp_path: Path
) -> None:
    train, query = data
    model = make_model()
    states = trained_checkpoints(model, train)
    compress = hookinf.LoGra(3, 2)
    stores = hookinf.log(model, train, loss_fn, compress=compress, path=tmp_path, checkpoints=states, progress=False)
    assert [s.path for s in stores] == [tmp_path / f"checkpoint-{k}" for k in range(3)]
    from_stores = hookinf.influence(model, stores, query, loss_fn, method="exact", checkpoints=states, progress=False)
    from_data = hookinf.influence(
        model, train, query, loss_fn, method="exact", compress=compress, checkpoints=states, progress=False
    )
    # the same compressed gradients (stored in float64) and the same formulas, summed in another grouping
    torch.testing.assert_close(from_stores.total, from_data.total, rtol=1e-10, atol=1e-12)
    self_from_stores = hookinf.self_influence(model, stores, loss_fn, method="exact", checkpoints=states)
    self_from_data = hookinf.self_influence(
        model, train, loss_fn, method="exact", compress=compress, checkpoints=states
    )
    torch.testing.assert_close(self_from_stores.total, self_from_data.total, rtol=1e-10, atol=1e-12)

    with pytest.raises(hookinf.StoreError, match="taken at other weights"):
        hookinf.influence(model, stores[::-1], query, loss_fn, method="exact", checkpoints=states, progress=False)
    with pytest.raises(ConfigurationError, match="one store per checkpoint"):
        hookinf.influence(model, stores[0], query, loss_fn, method="exact", checkpoints=states, progress=False)
    with pytest.raises(ConfigurationError, match="2 gradient stores for 3 checkpoints"):
        hookinf.influence(model, stores[:2], query, loss_fn, method="exact", checkpoints=states, progress=False)


def test_a_ddp_wrapped_model_takes_checkpoints_saved_from_either_side(data: Any, tmp_path: Path) -> None:
    """checkpoints= with a DistributedDataParallel model (one gloo process here): the hooks and names are the inner
    model's, and a checkpoint saved from the wrapper (names ``module.…``) or from the inner model reads alike."""
    import torch.distributed as dist

    train, query = data
    model = make_model()
    states = trained_checkpoints(model, train, count=2)
    want = hookinf.influence(model, train, query, loss_fn, method="exact", checkpoints=states, progress=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        before = state_bits(model)
        from_wrapper = [{f"module.{name}": value for name, value in state.items()} for state in states]
        for given in (states, from_wrapper):
            got = hookinf.influence(wrapped, train, query, loss_fn, method="exact", checkpoints=given, progress=False)
            for name in want.layers:
                assert torch.equal(got.per_layer[name], want.per_layer[name]), name
        assert all(torch.equal(value, before[name]) for name, value in state_bits(model).items())
    finally:
        dist.destroy_process_group()
