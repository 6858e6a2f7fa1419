"""Statistics accumulated inside the user's own loop equal hookinf.fit over the same data at fixed weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hookinf
from hookinf import ConfigurationError, HookinfError


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    batches = [(x[i : i + 6], y[i : i + 6]) for i in range(0, 24, 6)]
    return model, batches


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def user_loop(model, batches, optimizer):
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()  # mean loss: the watch's default loss_reduction
        optimizer.step()


@pytest.mark.parametrize("method", ["kfac", "exact"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_loop_statistics_equal_fit_at_zero_learning_rate(setup, method, optimizer):
    model, batches = setup
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.0)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=0.0)
    )
    reference = hookinf.fit(model, batches, loss_fn, method=method, progress=False)
    with hookinf.watch(model, fit=method) as w:
        user_loop(model, batches, opt)
        collected = w.curvature()
    assert collected.num_examples == reference.num_examples == 24
    for key, value in reference.tensors.items():
        # same float64 sums, accumulated in the same batch order: equal up to the mean→per-example rescaling (×B)
        torch.testing.assert_close(collected.tensors[key], value, rtol=1e-12, atol=1e-14)


def test_ekfac_correction_pass_in_the_loop_equals_fit(setup):
    model, batches = setup
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with hookinf.watch(model, fit="kfac") as w:
        user_loop(model, batches, opt)
        kfac = w.curvature()
    with hookinf.watch(model, fit=hookinf.EKFAC(basis=kfac)) as w:
        user_loop(model, batches, opt)
        ekfac = w.curvature()
    reference = hookinf.fit(model, batches, loss_fn, method="ekfac", progress=False)
    for key, value in reference.tensors.items():
        torch.testing.assert_close(ekfac.tensors[key], value, rtol=1e-12, atol=1e-14)


def test_two_pass_method_in_one_loop_is_refused(setup):
    model, _ = setup
    with pytest.raises(ConfigurationError, match="two passes") as exc:
        hookinf.watch(model, fit="ekfac")
    assert isinstance(exc.value, HookinfError)


def test_curvature_without_fit_is_refused(setup):
    model, _ = setup
    with hookinf.watch(model) as w, pytest.raises(ConfigurationError, match="fit='kfac'"):
        w.curvature()


LOGRA = hookinf.LoGra(3, 2)


def test_compressed_statistics_and_store_from_one_loop_score_like_fit(setup, tmp_path):
    """watch(fit=..., log_to=..., compress=...) gives the compressed K-FAC of hookinf.fit(compress=...) and a store
    that, scored with it, equals hookinf.influence in memory — the user's loop is the only pass over train."""
    model, batches = setup
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with hookinf.watch(model, fit="kfac", log_to=tmp_path / "grads", compress=LOGRA) as w:
        for i, (x, y) in enumerate(batches):
            w.tag(torch.arange(6 * i, 6 * i + 6))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        kfac = w.curvature()
    reference = hookinf.fit(model, batches, loss_fn, method="kfac", compress=LOGRA, progress=False)
    assert kfac.extra["compressor"] == reference.extra["compressor"] == LOGRA.config()
    assert kfac.tensors.keys() == reference.tensors.keys()
    for key, value in reference.tensors.items():
        # the same float64 sums in the same order, up to the mean→per-example rescaling (×B): 1e-12
        torch.testing.assert_close(kfac.tensors[key], value, rtol=1e-12, atol=1e-14)
    query = [batches[0]]
    store = hookinf.GradientStore(tmp_path / "grads")
    from_loop = hookinf.influence(model, store, query, loss_fn, method=kfac, progress=False)
    in_memory = hookinf.influence(model, batches, query, loss_fn, method=reference, compress=LOGRA, progress=False)
    torch.testing.assert_close(from_loop.total, in_memory.total, rtol=1e-10, atol=1e-12)


def test_compressed_ekfac_correction_in_the_loop_equals_fit(setup):
    model, batches = setup
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with hookinf.watch(model, fit="kfac", compress=LOGRA) as w:
        user_loop(model, batches, opt)
        kfac = w.curvature()
    with hookinf.watch(model, fit=hookinf.EKFAC(basis=kfac), compress=LOGRA) as w:
        user_loop(model, batches, opt)
        ekfac = w.curvature()
    reference = hookinf.fit(model, batches, loss_fn, method="ekfac", compress=LOGRA, progress=False)
    for key, value in reference.tensors.items():
        torch.testing.assert_close(ekfac.tensors[key], value, rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigurationError, match="pass the compressor the basis was fitted with"):
        hookinf.watch(model, fit=hookinf.EKFAC(basis=kfac))  # uncompressed watch, compressed basis
    with pytest.raises(ConfigurationError, match="pass the compressor the basis was fitted with"):
        hookinf.watch(model, fit=hookinf.EKFAC(basis=kfac), compress=hookinf.LoGra(2, 2))


def test_compress_needs_something_to_compress(setup):
    model, _ = setup
    with pytest.raises(ConfigurationError, match="log_to= stores or what fit= accumulates"):
        hookinf.watch(model, compress=LOGRA)
    with pytest.raises(ConfigurationError, match="needs compress="):
        hookinf.watch(model, log_to="unused")
