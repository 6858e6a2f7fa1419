"""Device placement and host synchronisation, checked with CPU stand-ins (and on CUDA when a GPU is present).

* ``torch.set_default_device("meta")`` with the model and data on the CPU: any tensor hookinf creates without taking
  the device from the model, the capture or the host explicitly lands on ``meta`` and the entry point fails (or its
  numbers are lost). Every entry point must give the numbers it gives without a default device — exactly.
* A ``TorchDispatchMode`` counts the aten calls that read a device tensor on the host (``_local_scalar_dense``,
  ``nonzero``, ``is_nonzero``, ``equal``): on an accelerator each is a synchronisation that stalls the step. A
  watched training step (logging, statistics) may add at most one per step to the same plain steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import HostReads
from torch import Tensor, nn

import hookinf
from hookinf.losses import draw_labels
from hookinf.transfer import HostCopier

LOGRA = hookinf.LoGra(3, 2)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def make_data(n: int = 24, batch: int = 6, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@dataclass(frozen=True)
class Case:
    """A model whose every entry point is checked: the MLP above, a CNN, or a LoRA GPT-2 (sequences)."""

    build: Callable[[], nn.Module]
    data: Callable[[int, int, int], list[tuple[Tensor, Tensor]]]  # (n, batch, seed) → batches
    loss_fn: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]  # per-example losses [B]
    sequences: bool = False  # per-token scores too

    def step_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The training loop's loss: the batch mean."""
        return self.loss_fn(model, batch).mean()


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(16, 3),
    ).double()  # fmt: skip


def cnn_data(n: int = 24, batch: int = 6, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def make_lora_gpt2() -> nn.Module:
    """GPT-2 (one block) in float64 with peft LoRA on its attention Conv1Ds and its MLP's ``c_fc`` Conv1D trained."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=11,
        n_positions=5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=10,
        eos_token_id=10,
    )
    base = transformers.GPT2LMHeadModel(config).double()
    lora = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(base, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # peft's zeros would make every lora_A gradient zero
                parameter.normal_(0.0, 0.3)
    for parameter in model.base_model.model.transformer.h[0].mlp.c_fc.parameters():
        parameter.requires_grad_(True)  # a plain GPT-2 Conv1D tracked beside the adapters
    return model


def token_data(n: int = 24, batch: int = 6, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    ids = torch.randint(0, 11, (n, 5), generator=torch.Generator().manual_seed(seed))
    return [(ids[i : i + batch], ids[i : i + batch]) for i in range(0, n, batch)]


def token_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Each sequence's next-token cross-entropy, summed over its positions."""
    logits = model(input_ids=batch[0]).logits[:, :-1]
    losses = F.cross_entropy(logits.transpose(1, 2), batch[1][:, 1:], reduction="none")
    return losses.sum(dim=1)


CASES = {
    "mlp": Case(make_model, make_data, loss_fn),
    "cnn": Case(make_cnn, cnn_data, loss_fn),
    "lora-gpt2": Case(make_lora_gpt2, token_data, token_loss, sequences=True),
}


@pytest.fixture
def meta_default() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def entry_points(
    model: nn.Module, train: list[Any], query: list[Any], path: Path, case: Case = CASES["mlp"]
) -> dict[str, Tensor]:
    """Every entry point's numbers on one model (each as a CPU tensor)."""
    out: dict[str, Tensor] = {}
    loss = case.loss_fn
    for method in ("exact", "identity", "datainf", "kfac", "ekfac"):
        out[f"influence {method}"] = hookinf.influence(model, train, query, loss, method=method, progress=False).total
    out["influence lissa"] = hookinf.influence(
        model, train, query, loss, method=hookinf.LiSSA(depth=4, batch_size=6), progress=False
    ).total
    out["self_influence exact"] = hookinf.self_influence(model, train, loss, progress=False).total
    kfac = hookinf.fit(model, train, loss, method="kfac", compress=LOGRA, progress=False)
    first, *_, last = list(kfac.layers)
    out["fit kfac (LoGra)"] = kfac.stat(first, "A")
    ekfac = hookinf.fit(model, train, loss, method="ekfac", progress=False)
    out["fit ekfac"] = ekfac.stat(last, "eigen")
    loaded = hookinf.load(ekfac.save(path / "ekfac"))
    out["loaded ekfac"] = hookinf.influence(model, train, query, loss, method=loaded, progress=False).total
    for compress in (LOGRA, hookinf.Dropout(r=9), hookinf.Gaussian(8)):
        store = hookinf.log(model, train, loss, compress=compress, path=path / compress.kind, progress=False)
        out[f"store {compress.kind}"] = hookinf.influence(model, store, query, loss, progress=False).total
    logra = hookinf.GradientStore(path / "logra")
    out["store kfac"] = hookinf.influence(model, logra, query, loss, method=kfac, progress=False).total
    out["self_influence store"] = hookinf.self_influence(model, logra, loss, progress=False).total
    out["top_k data"] = hookinf.top_k(model, train, query, loss, k=3, method=ekfac, progress=False).harmful_scores
    out["top_k store"] = hookinf.top_k(model, logra, query, loss, k=3, method=kfac, progress=False).helpful_scores
    pre = hookinf.precondition_store(logra, kfac, path / "preconditioned", progress=False)
    out["preconditioned top_k"] = hookinf.top_k(model, pre, query, loss, k=3, progress=False).harmful_scores
    if case.sequences:
        tokens = hookinf.influence(model, train, query, loss, method=ekfac, per_token=True, progress=False).per_token
        assert tokens is not None
        out["influence per-token"] = torch.stack(list(tokens.values())).sum(dim=0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    snaps = hookinf.Snapshots(model, every=1, to=path / "snapshots")
    with hookinf.watch(model, fit="kfac", log_to=path / "watched", compress=LOGRA) as w:
        for i, batch in enumerate(train):
            w.tag(range(6 * i, 6 * i + 6))
            optimizer.zero_grad()
            case.step_loss(model, batch).backward()
            optimizer.step()
            snaps.take(i)
        out["watch per-example"] = w.per_example_gradients()[first]
    out["watch kfac"] = w.curvature().stat(first, "S")
    out["watch store"] = hookinf.GradientStore(path / "watched").chunks().__next__()[1][first]
    over = hookinf.influence(
        model, train, query, loss, method="kfac", checkpoints=snaps.checkpoints[-2:], progress=False
    )  # fmt: skip
    out["checkpoints"] = over.total
    saved = hookinf.load_scores(over.per_checkpoint[0].save(path / "scores"))
    out["saved scores"] = saved.total
    saved.save_html(path / "report.html")  # the report's numbers, plots and tables from scores on the host
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_every_entry_point_takes_its_devices_from_the_model_not_the_default(
    tmp_path: Path, meta_default: None, name: str
) -> None:
    torch.set_default_device(None)
    case = CASES[name]
    model, train, query = case.build(), case.data(24, 6, 1), case.data(6, 3, 2)
    expected = entry_points(model, train, query, tmp_path / "plain", case)
    torch.set_default_device("meta")
    got = entry_points(model, train, query, tmp_path / "meta", case)
    torch.set_default_device(None)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].device.type == "cpu", key
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


SAMPLED = hookinf.CrossEntropy(logits=lambda model, batch: model(batch[0]), target=lambda batch: batch[1])


def sampled_fit(model: nn.Module, train: list[Any]) -> dict[str, Tensor]:
    """An EK-FAC fit on the sampled Fisher: labels drawn on the logits' device, each pass afresh."""
    fit = hookinf.fit(model, train, SAMPLED, method="ekfac", fisher="sampled", seed=3, progress=False)
    return {key: value.cpu() for key, value in fit.tensors.items()}


def test_sampled_labels_are_drawn_on_the_logits_device_not_the_default(meta_default: None) -> None:
    torch.set_default_device(None)
    model, train = make_model(), make_data()
    expected = sampled_fit(model, train)
    torch.set_default_device("meta")
    got = sampled_fit(model, train)
    torch.set_default_device(None)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    # A model on meta: any copy of the logits to the host would fail (a meta tensor holds no values to copy).
    x, y = train[0]
    losses = SAMPLED.sampled(make_model().to("meta"), (x.to("meta"), y.to("meta")), hookinf.Sampler(0))
    assert losses.device.type == "meta"
    assert losses.shape == (6,)


def train_steps(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], tag: Any = None, case: Case = CASES["mlp"]
) -> HostReads:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    with HostReads() as reads:
        for i, batch in enumerate(batches):
            if tag is not None:
                tag(range(6 * i, 6 * i + 6))
            optimizer.zero_grad()
            case.step_loss(model, batch).backward()
            optimizer.step()
    return reads


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"log_to": True, "compress": LOGRA},
        {"log_to": True, "compress": hookinf.Dropout(r=9), "flush_every": 12},
        {"fit": "kfac"},
        {"fit": "exact", "log_to": True, "compress": LOGRA, "flush_every": 6},
    ],
    ids=["capture", "log-logra", "log-dropout-flushing", "fit-kfac", "fit-exact-and-log"],
)
@pytest.mark.parametrize("name", list(CASES))
def test_a_watched_step_reads_the_device_at_most_once_more_than_a_plain_step(
    tmp_path: Path, options: dict[str, Any], name: str
) -> None:
    case = CASES[name]
    batches = case.data(48, 6, 1)
    plain = train_steps(case.build(), batches, case=case)
    model = case.build()
    if options.get("log_to"):
        options = {**options, "log_to": tmp_path / "store"}
    with hookinf.watch(model, **options) as w:
        watched = train_steps(model, batches, w.tag if options.get("log_to") else None, case)
    assert watched.count <= plain.count + len(batches), watched.calls


def test_sampled_labels_read_nothing_on_the_host() -> None:
    model, (batch, *_) = make_model(), make_data()
    sampler = hookinf.Sampler(0)
    with HostReads() as reads:
        SAMPLED.sampled(model, batch, sampler).sum().backward()
    assert reads.count == 0, reads.calls


def test_a_nonfinite_step_is_reported_one_step_late_and_never_stored(tmp_path: Path) -> None:
    model, batches = make_model(), make_data(24)
    with (  # noqa: PT012 - the loop is the subject
        pytest.raises(hookinf.NonFiniteGradientError, match="'0'"),
        hookinf.watch(model, log_to=tmp_path / "store", compress=LOGRA, flush_every=100) as w,
    ):
        for i, (x, y) in enumerate(batches):
            w.tag(range(6 * i, 6 * i + 6))
            scale = float("nan") if i == 2 else 1.0
            (F.cross_entropy(model(x), y) * scale).backward()
    store = hookinf.GradientStore(tmp_path / "store")
    assert store.ids.tolist() == list(range(12))  # the two finite steps before it are kept; it and later are not


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_on_cuda_every_entry_point_equals_the_cpu(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    model, train, query = case.build(), case.data(24, 6, 1), case.data(6, 3, 2)
    expected = entry_points(model, train, query, tmp_path / "cpu", case)
    cuda = case.build().cuda()
    on = [(x.cuda(), y.cuda()) for x, y in train]
    got = entry_points(cuda, on, [(x.cuda(), y.cuda()) for x, y in query], tmp_path / "cuda", case)
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key].cpu(), value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_sampled_labels_are_drawn_on_the_device_reproducibly() -> None:
    model, train = make_model().cuda(), [(x.cuda(), y.cuda()) for x, y in make_data()]
    logits = model(train[0][0])
    assert draw_labels(logits, hookinf.Sampler(0).generator(logits.device)).is_cuda
    first, again = sampled_fit(model, train), sampled_fit(model, train)
    for key, value in first.items():
        assert torch.equal(value, again[key]), key


# ---------------------------------------------------------------------------------------------------- host copies
def test_host_copies_pass_host_tensors_through_and_wait_for_nothing() -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    copy = HostCopier().copy(tensors)
    assert copy.events == []
    waited = copy.wait()
    assert list(waited) == ["a", "b"]
    assert all(waited[name] is tensors[name] for name in tensors)  # no copy of what is on the host already


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_copies_of_cuda_tensors_are_pinned_enqueued_on_a_side_stream_and_exact() -> None:
    device = torch.device("cuda")
    tensors = {name: torch.randn(256, 1024, device=device) * (i + 1) for i, name in enumerate(("x", "y"))}
    expected = {name: t.cpu() for name, t in tensors.items()}
    copy = HostCopier().copy(tensors)
    assert len(copy.events) == 1
    del tensors  # the side stream keeps their memory until the copy has read it (record_stream)
    torch.cuda.empty_cache()
    waited = copy.wait()
    for name, host in waited.items():
        assert host.device.type == "cpu"
        assert host.is_pinned()
        assert torch.equal(host, expected[name])
