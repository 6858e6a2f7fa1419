"""Tests of the capture layer: ``hookinf.watch`` → ``Step`` / ``LayerCapture`` → per-example gradients.

Every numerical check compares against the ``torch.func`` oracle of ``conftest.func_per_example_grads``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import pickle
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPE,
    LORA_TARGETS,
    MINILM_LAYERS,
    MODEL_CASES,
    ModelCase,
    assert_close,
    assert_close_mapping,
    close,
    func_per_example_grads,
    seeded,
)
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import hookinf
from hookinf import watch
from hookinf.errors import (
    CaptureError,
    ConfigurationError,
    HookinfError,
    HookinfWarning,
    NestedWatchError,
    NonFiniteGradientError,
    NoTrackableModuleError,
    PatternMatchError,
    UnsupportedModuleError,
)

# Both the hooks (Σ_s δ_s a_sᵀ) and torch.func (vmap of grad) compute the same exact float64 gradients; they differ
# only in the order of floating-point summation, so they agree to a few ulps times the number of summed terms:
# far below 1e-10 relative. The absolute floor (1e-13 of the tensor's largest entry) only covers entries that
# cancel to (nearly) zero, where a relative error is meaningless.
RTOL = 1e-10
ATOL_SCALE = 1e-13


@pytest.fixture(autouse=True)
def _seed_everything() -> Iterator[None]:
    """Every test here starts from the same global RNG state (models built inline, random inputs)."""
    with seeded(0):
        yield


def _reduce(losses: Tensor, loss_reduction: str) -> Tensor:
    return losses.mean() if loss_reduction == "mean" else losses.sum()


def _tracked_oracle(model: nn.Module, got: dict[str, Tensor], oracle: dict[str, Tensor]) -> dict[str, Tensor]:
    """The oracle's entries for the parameters in ``got``, matched by parameter identity (tied names differ)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return {key: oracle[name_of[id(model.get_parameter(key))]] for key in got}


def _expected_keys(model: nn.Module, layers: tuple[str, ...]) -> set[str]:
    """Qualified names of the trainable parameters owned by the tracked layers."""
    keys = set()
    for layer in layers:
        for pname, p in model.get_submodule(layer).named_parameters(recurse=False):
            if p.requires_grad:
                keys.add(f"{layer}.{pname}")
    return keys


def _capture(case: ModelCase, loss_reduction: str = "mean", **kwargs: Any) -> dict[str, Tensor]:
    with watch(case.model, modules=case.modules, loss_reduction=loss_reduction, **kwargs) as w:
        _reduce(case.losses(), loss_reduction).backward()
        got = w.per_example_param_gradients()
    case.model.zero_grad(set_to_none=True)
    return got


def _assert_error(info: pytest.ExceptionInfo[BaseException], cls: type[HookinfError], *names: str) -> None:
    __tracebackhide__ = True
    assert type(info.value) is cls, f"expected {cls.__name__}, got {type(info.value).__name__}: {info.value}"
    assert isinstance(info.value, HookinfError)
    message = str(info.value)
    for name in names:
        assert name in message, f"the message does not name {name!r}: {message}"


# ================================================================================================ correctness
def test_oracle_sums_to_batch_gradient(model_case: ModelCase) -> None:
    """The oracle itself: its per-example gradients sum to plain autograd's gradient of the summed loss."""
    oracle = model_case.oracle()
    model_case.losses().sum().backward()
    batch_grads = {name: p.grad for name, p in model_case.model.named_parameters() if p.requires_grad}
    assert_close_mapping(
        {name: g.sum(0) for name, g in oracle.items()}, batch_grads, rtol=RTOL, atol_scale=ATOL_SCALE, what="oracle"
    )


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_per_example_gradients_match_oracle(model_case: ModelCase, loss_reduction: str) -> None:
    with watch(model_case.model, modules=model_case.modules, loss_reduction=loss_reduction) as w:
        _reduce(model_case.losses(), loss_reduction).backward()
        got = w.per_example_param_gradients()
        layers = w.layers
        step = w.last_step
    assert step is not None
    assert step.index == 0
    assert step.batch_size == model_case.batch_size
    assert tuple(step.layers) == layers
    assert set(got) == _expected_keys(model_case.model, layers)
    if model_case.covers_all_params:
        assert set(got) == {name for name, p in model_case.model.named_parameters() if p.requires_grad}
    oracle = _tracked_oracle(model_case.model, got, model_case.oracle())
    assert_close_mapping(got, oracle, rtol=RTOL, atol_scale=ATOL_SCALE, what=f"{model_case.id}/{loss_reduction}")


def test_per_example_gradient_matrices_match_param_gradients(make_case: Callable[[str], ModelCase]) -> None:
    """``per_example_gradients()`` ([B, O, I], bias last column) and the parameter-shaped view agree."""
    case = make_case("conv2d")
    with watch(case.model) as w:
        case.losses().mean().backward()
        matrices = w.per_example_gradients()
        params = w.per_example_param_gradients()
    b = case.batch_size
    conv1 = case.model.conv1
    assert matrices["conv1"].shape == (b, 3, 2 * 3 * 3 + 1)
    assert_close(matrices["conv1"][..., :-1].reshape(b, *conv1.weight.shape), params["conv1.weight"], rtol=0.0)
    assert_close(matrices["conv1"][..., -1], params["conv1.bias"], rtol=0.0)


@pytest.mark.slow
def test_lora_minilm_tracks_adapters_and_matches_oracle(lora_minilm: ModelCase) -> None:
    model = lora_minilm.model
    with watch(model, loss_reduction="sum") as w:
        lora_minilm.losses().sum().backward()
        got = w.per_example_param_gradients()
        layers = w.layers
    model.zero_grad(set_to_none=True)

    expected_layers = tuple(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (".lora_A." in name or ".lora_B." in name)
    )
    assert len(expected_layers) == 2 * len(LORA_TARGETS) * MINILM_LAYERS == 24
    assert layers == expected_layers
    assert all(any(f".{target}.lora_" in name for target in LORA_TARGETS) for name in layers)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable
    assert all(g.dtype == torch.float64 for g in got.values())
    oracle = lora_minilm.oracle()
    # Guard against a vacuous comparison (peft's zero-initialised lora_B makes lora_A's gradients zero).
    assert all(bool(g.abs().max() > 0) for g in oracle.values())
    assert_close_mapping(got, oracle, rtol=RTOL, atol_scale=ATOL_SCALE, what="lora-minilm")


# ================================================================================================ checkpointing
class _Checkpointed(nn.Module):
    """inp → [block] → head, with the block optionally run under activation checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)
        self.use_reentrant: bool | None = None  # None: no checkpointing

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        if self.use_reentrant is not None:
            return self.head(checkpoint(self.block, h, use_reentrant=self.use_reentrant))
        h = self.block(h)
        return self.head(h)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_same_captures(use_reentrant: bool) -> None:
    with seeded(10):
        model = _Checkpointed().to(DTYPE)
    gen = torch.Generator().manual_seed(11)
    batches = [(torch.randn(4, 5, generator=gen, dtype=DTYPE), torch.randint(0, 3, (4,), generator=gen)) for _ in "ab"]

    def run() -> list[dict[str, Tensor]]:
        results = []
        with watch(model) as w:
            for x, y in batches:
                F.cross_entropy(model(x), y).backward()
                results.append(w.per_example_param_gradients())
            assert w.steps == len(batches)  # the recomputed forwards inside backward close no step
        model.zero_grad(set_to_none=True)
        return results

    plain = run()
    model.use_reentrant = use_reentrant
    checkpointed = run()
    for step, (got, ref) in enumerate(zip(checkpointed, plain, strict=True)):
        assert set(got) == {name for name, _ in model.named_parameters()}
        for name in ref:  # recomputation repeats the same float64 operations: bitwise the same captures
            assert torch.equal(got[name], ref[name]), f"step {step}, {name}"
    model.use_reentrant = None
    oracle = func_per_example_grads(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), batches[-1])
    assert_close_mapping(checkpointed[-1], oracle, rtol=RTOL, atol_scale=ATOL_SCALE, what="vs oracle")


# ================================================================================================ selection
class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.LayerNorm(5))
        self.conv = nn.Conv1d(1, 2, kernel_size=3, padding=1)
        # Registered out-then-proj but called proj-then-out: "model order" is registration order.
        self.decoder = nn.ModuleDict({"out": nn.Linear(6, 2), "proj": nn.Linear(10, 6)})

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)  # [B, 5]
        h = self.conv(h.unsqueeze(1)).flatten(1)  # [B, 10]
        return self.decoder["out"](torch.tanh(self.decoder["proj"](h)))


ALL_NESTED = ("encoder.0", "encoder.2", "conv", "decoder.out", "decoder.proj")


def test_layers_lists_tracked_names_in_model_order() -> None:
    model = _Nested()
    with watch(model) as w:
        assert w.layers == ALL_NESTED
    assert list(watch(model, modules=["decoder.out", "encoder.0"]).layers) == ["encoder.0", "decoder.out"]


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        ("decoder.proj", ("decoder.proj",)),
        (["decoder.out", "conv"], ("conv", "decoder.out")),
        ("encoder.*", ("encoder.0", "encoder.2")),
        ("*.proj", ("decoder.proj",)),
        ("decoder.*", ("decoder.out", "decoder.proj")),
        (nn.Conv1d, ("conv",)),
        (nn.Linear, ("encoder.0", "encoder.2", "decoder.out", "decoder.proj")),
        ([nn.Conv1d, "decoder.o*", "encoder.2"], ("encoder.2", "conv", "decoder.out")),
        (["encoder.*", "encoder.0"], ("encoder.0", "encoder.2")),
    ],
    ids=["exact", "exact-list", "glob", "glob-suffix", "glob-dict", "type", "type-linear", "mixed", "overlapping"],
)
def test_modules_selection(modules: Any, expected: tuple[str, ...]) -> None:
    model = _Nested().to(DTYPE)
    x = torch.randn(3, 4, dtype=DTYPE)
    with watch(model, modules=modules, loss_reduction="sum") as w:
        assert w.layers == expected
        model(x).pow(2).sum().backward()
        got = w.per_example_param_gradients()
    assert set(got) == _expected_keys(model, expected)
    oracle = func_per_example_grads(model, lambda m, b: m(b[0]).pow(2).sum(1), (x,))
    assert_close_mapping(got, {k: oracle[k] for k in got}, rtol=RTOL, atol_scale=ATOL_SCALE, what=str(modules))


def test_frozen_modules_are_not_tracked_by_default() -> None:
    model = _Nested().to(DTYPE)
    model.encoder.requires_grad_(False)
    model.decoder["proj"].bias.requires_grad_(False)  # a frozen bias: the weight is still tracked, without bias
    x = torch.randn(3, 4, dtype=DTYPE)
    with watch(model, loss_reduction="sum") as w:
        assert w.layers == ("conv", "decoder.out", "decoder.proj")
        model(x).pow(2).sum().backward()
        got = w.per_example_param_gradients()
    assert set(got) == {"conv.weight", "conv.bias", "decoder.proj.weight", "decoder.out.weight", "decoder.out.bias"}
    oracle = func_per_example_grads(model, lambda m, b: m(b[0]).pow(2).sum(1), (x,))
    assert_close_mapping(got, oracle, rtol=RTOL, atol_scale=ATOL_SCALE, what="partly frozen")


# ================================================================================================ errors
def test_all_frozen_model_raises() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)).requires_grad_(False)
    with pytest.raises(NoTrackableModuleError) as info:
        watch(model)
    _assert_error(info, NoTrackableModuleError, "Sequential", "Linear", "requires_grad")


def test_layernorm_only_model_raises() -> None:
    model = nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4))
    with pytest.raises(NoTrackableModuleError) as info:
        watch(model)
    _assert_error(info, NoTrackableModuleError, "Sequential", "LayerNorm", "torch.nn.modules.linear.Linear")


@pytest.mark.parametrize("pattern", ["decoder.proj2", "nothing.*", "encoder.[3]"], ids=["typo", "glob", "unsupported"])
def test_pattern_matching_nothing_raises(pattern: str) -> None:
    with pytest.raises(PatternMatchError) as info:
        watch(_Nested(), modules=["conv", pattern])
    _assert_error(info, PatternMatchError, repr(pattern), "'decoder.proj'")


def test_pattern_matching_only_frozen_modules_raises() -> None:
    model = _Nested()
    model.encoder.requires_grad_(False)
    with pytest.raises(PatternMatchError) as info:
        watch(model, modules="encoder.*")
    _assert_error(info, PatternMatchError, "'encoder.*'", "'encoder.0'")


def test_exact_name_of_unsupported_module_raises() -> None:
    with pytest.raises(UnsupportedModuleError) as info:
        watch(_Nested(), modules=["conv", "encoder.3"])  # a LayerNorm
    _assert_error(info, UnsupportedModuleError, "'encoder.3'", "LayerNorm", "torch.nn.modules.linear.Linear")


def test_exact_name_of_frozen_module_raises() -> None:
    model = _Nested()
    model.conv.requires_grad_(False)
    with pytest.raises(UnsupportedModuleError) as info:
        watch(model, modules="conv")
    _assert_error(info, UnsupportedModuleError, "'conv'", "requires_grad")


def test_invalid_loss_reduction_raises() -> None:
    with pytest.raises(ConfigurationError) as info:
        watch(_Nested(), loss_reduction="batchmean")  # type: ignore[arg-type]
    _assert_error(info, ConfigurationError, "'batchmean'", "'mean'", "'sum'")


def test_invalid_modules_entry_raises() -> None:
    with pytest.raises(ConfigurationError) as info:
        watch(_Nested(), modules=["conv", 3])  # type: ignore[list-item]
    _assert_error(info, ConfigurationError, "3")


def test_grouped_conv_raises() -> None:
    model = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(4, 4, kernel_size=3, groups=2), flat=nn.Flatten(), fc=nn.Linear(4 * 3 * 3, 2))
    )
    for modules in (None, "conv", nn.Conv2d):
        with pytest.raises(UnsupportedModuleError) as info:
            watch(model, modules=modules)
        _assert_error(info, UnsupportedModuleError, "'conv'", "groups=2")
    assert watch(model, modules="fc").layers == ("fc",)


def test_nested_watch_on_same_model_raises(make_case: Callable[[str], ModelCase]) -> None:
    case = make_case("mlp-bias")
    model = case.model
    before = _hygiene_snapshot(model)
    with watch(model) as outer:
        with pytest.raises(NestedWatchError) as info, watch(model):
            pass
        _assert_error(info, NestedWatchError, "'fc1'")
        with pytest.raises(NestedWatchError) as info, outer:  # the same Watch object twice
            pass
        _assert_error(info, NestedWatchError)
        # The refused inner watches left the outer one intact.
        case.losses().mean().backward()
        got = outer.per_example_param_gradients()
    assert_close_mapping(got, case.oracle(), rtol=RTOL, atol_scale=ATOL_SCALE, what="outer watch")
    model.zero_grad(set_to_none=True)
    _assert_hygiene(model, before)
    with watch(model):  # and it can be watched again afterwards
        pass


class _WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h, _ = self.attn(h, h, h)
        return self.head(h).sum((1, 2))


def test_multihead_attention_out_proj_is_an_error_and_can_be_excluded() -> None:
    with seeded(12):
        model = _WithAttention().to(DTYPE)
    x = torch.randn(3, 5, 4, dtype=DTYPE)
    before = _hygiene_snapshot(model)
    # out_proj is an nn.Linear subclass, so it is selected, but MultiheadAttention never calls its forward.
    assert "attn.out_proj" in watch(model).layers

    def query_inside() -> None:
        with watch(model) as w:
            model(x).sum().backward()
            w.per_example_param_gradients()

    with pytest.raises(CaptureError) as info:
        query_inside()
    _assert_error(info, CaptureError, "'attn.out_proj'", "modules=")
    model.zero_grad(set_to_none=True)
    _assert_hygiene(model, before)

    # Without querying, the error surfaces when the block exits.
    def exit_without_query() -> None:
        with watch(model):
            model(x).sum().backward()

    with pytest.raises(CaptureError) as info:
        exit_without_query()
    _assert_error(info, CaptureError, "'attn.out_proj'")
    model.zero_grad(set_to_none=True)
    _assert_hygiene(model, before)

    with watch(model, modules=["inp", "head"], loss_reduction="sum") as w:
        model(x).sum().backward()
        got = w.per_example_param_gradients()
    oracle = func_per_example_grads(model, lambda m, b: m(b[0]), (x,))
    assert_close_mapping(got, {k: oracle[k] for k in got}, rtol=RTOL, atol_scale=ATOL_SCALE, what="excluded")


class _FlattensTokens(nn.Module):
    """Reshapes [B, T, d] to [B*T, d] before its head, so the head sees a batch of B*T rows."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.proj(x))
        return self.head(h.reshape(-1, h.shape[-1])).view(x.shape[0], -1).sum(1)


def test_layers_seeing_different_batch_sizes_raise() -> None:
    model = _FlattensTokens().to(DTYPE)
    x = torch.randn(3, 5, 4, dtype=DTYPE)

    def run() -> None:
        with watch(model, loss_reduction="sum") as w:
            model(x).sum().backward()
            w.per_example_param_gradients()

    with pytest.raises(CaptureError) as info:
        run()
    _assert_error(info, CaptureError, "'head'", "'proj'", "15", "3")
    model.zero_grad(set_to_none=True)
    with watch(model, modules="proj", loss_reduction="sum") as w:  # the remedy the message suggests
        model(x).sum().backward()
        assert w.per_example_param_gradients()["proj.weight"].shape == (3, 4, 4)


def test_unbatched_input_raises() -> None:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(3, 2))).to(DTYPE)
    with watch(model) as w, pytest.raises(UnsupportedModuleError) as info:
        model(torch.randn(3, dtype=DTYPE))
    _assert_error(info, UnsupportedModuleError, "'fc'", "[3]", "unsqueeze")
    assert w.steps == 0


@pytest.mark.parametrize("query", [True, False], ids=["on-query", "on-exit"])
def test_nonfinite_gradient_raises(query: bool) -> None:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(3, 2), act=nn.Tanh(), out=nn.Linear(2, 1))).to(DTYPE)
    x = torch.randn(4, 3, dtype=DTYPE)

    def run() -> None:
        with watch(model, modules="fc") as w:
            (model(x).sum() * float("nan")).backward()
            if query:
                w.per_example_param_gradients()

    with pytest.raises(NonFiniteGradientError) as info:
        run()
    _assert_error(info, NonFiniteGradientError, "'fc'", "NaN")
    assert isinstance(info.value, CaptureError)


# ================================================================================================ hook hygiene
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _bits(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _hygiene_snapshot(model: nn.Module) -> dict[str, Any]:
    import torch.nn.modules.module as module_mod

    return {
        "hooks": {
            (name, d): dict(getattr(m, d))
            for name, m in model.named_modules(remove_duplicate=False)
            for d in _HOOK_DICTS
            if hasattr(m, d)
        },
        "global_hooks": {g: dict(getattr(module_mod, g)) for g in _GLOBAL_HOOKS},
        "module_attrs": {name: sorted(vars(m)) for name, m in model.named_modules(remove_duplicate=False)},
        "modules": [(name, id(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "params": [
            (name, id(p), p.requires_grad, sorted(vars(p)), p._backward_hooks, p._post_accumulate_grad_hooks)
            for name, p in model.named_parameters(remove_duplicate=False)
        ],
        "state": {k: (v.dtype, tuple(v.shape), _bits(v)) for k, v in model.state_dict().items()},
        "buffers": [(name, id(b)) for name, b in model.named_buffers(remove_duplicate=False)],
    }


def _assert_hygiene(model: nn.Module, before: dict[str, Any]) -> None:
    __tracebackhide__ = True
    after = _hygiene_snapshot(model)
    for (name, d), hooks in after["hooks"].items():
        assert not hooks, f"module {name!r} still has {d}: {hooks}"
    for key in before:
        assert after[key] == before[key], f"{key} changed by the watch"


def _warm_up(case: ModelCase) -> None:
    """One forward/backward outside any watch, so lazily created library state is not blamed on hookinf."""
    case.losses().sum().backward()
    case.model.zero_grad(set_to_none=True)


def test_no_hooks_or_state_left_after_normal_exit(model_case: ModelCase) -> None:
    _warm_up(model_case)
    before = _hygiene_snapshot(model_case.model)
    with watch(model_case.model, modules=model_case.modules) as w:
        for seed in range(2):
            model_case.losses(model_case.make_batch(seed)).mean().backward()
            w.per_example_param_gradients()
        with torch.no_grad():
            model_case.losses()  # an evaluation forward that never gets a backward
        model_case.losses()  # a grad-enabled forward that never gets a backward
    model_case.model.zero_grad(set_to_none=True)
    _assert_hygiene(model_case.model, before)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("when", ["before-forward", "after-forward", "after-backward", "mid-backward"])
def test_no_hooks_or_state_left_after_exception(model_case: ModelCase, when: str) -> None:
    _warm_up(model_case)
    before = _hygiene_snapshot(model_case.model)

    def explode(grad: Tensor) -> Tensor:
        raise _Boom

    def run() -> None:
        with watch(model_case.model, modules=model_case.modules) as w:
            if when == "before-forward":
                raise _Boom
            losses = model_case.losses()
            if when == "after-forward":
                raise _Boom
            if when == "mid-backward":
                losses.register_hook(explode)
            losses.mean().backward()
            w.per_example_param_gradients()
            raise _Boom

    with pytest.raises(_Boom):
        run()
    model_case.model.zero_grad(set_to_none=True)
    _assert_hygiene(model_case.model, before)
    # The model is still watchable and gives correct results afterwards.
    got = _capture(model_case)
    assert_close_mapping(
        got, _tracked_oracle(model_case.model, got, model_case.oracle()), rtol=RTOL, atol_scale=ATOL_SCALE, what="after"
    )


def test_captures_do_not_accumulate_over_steps(make_case: Callable[[str], ModelCase]) -> None:
    case = make_case("mlp-bias")
    n_steps = 50
    refs: list[list[weakref.ref[Any]]] = []
    with watch(case.model) as w:
        for seed in range(n_steps):
            case.losses(case.make_batch(seed)).mean().backward()
            case.model.zero_grad(set_to_none=True)
            step = w.last_step
            assert step is not None
            assert step.index == seed
            refs.append([weakref.ref(step)] + [weakref.ref(t) for c in step.layers.values() for t in (c.a, c.delta)])
            del step
        assert w.steps == n_steps
        gc.collect()
        alive = [i for i, group in enumerate(refs) if any(ref() is not None for ref in group)]
        assert alive == [n_steps - 1], f"captures of steps {alive[:-1]} are still alive"
        last = w.last_step
        assert last is not None
        assert {name: c.a.shape[:2] for name, c in last.layers.items()} == {"fc1": (4, 1), "fc2": (4, 1)}
    assert w.steps == n_steps


def test_second_backward_with_create_graph_does_not_change_capture(make_case: Callable[[str], ModelCase]) -> None:
    """AdaHessian-style Hessian-vector product: grad with create_graph=True, then a backward through that graph."""
    case = make_case("mlp-bias")  # tanh: a non-zero second derivative, so the HVP goes back through fc1's output
    model = case.model
    params = [p for p in model.parameters() if p.requires_grad]
    reference = _capture(case)

    gen = torch.Generator().manual_seed(14)
    rademacher = [torch.randint(0, 2, p.shape, generator=gen).to(DTYPE) * 2 - 1 for p in params]
    with watch(model) as w:
        loss = case.losses().mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hvps = torch.autograd.grad(grads, params, grad_outputs=rademacher)
        assert any(bool(h.abs().max() > 0) for h in hvps)
        assert w.steps == 1
        got = w.per_example_param_gradients()
        assert w.steps == 1
    for name in reference:
        assert torch.equal(got[name], reference[name]), name
    assert_close_mapping(got, case.oracle(), rtol=RTOL, atol_scale=ATOL_SCALE, what="after HVP")


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_lamb_training_loop_runs_unchanged(make_case: Callable[[str], ModelCase], loss_reduction: str) -> None:
    torch_optimizer = pytest.importorskip("torch_optimizer")
    case = make_case("conv2d")
    model = case.model
    twin = copy.deepcopy(model)
    batches = [case.make_batch(seed) for seed in range(4)]

    optimizer = torch_optimizer.Lamb(model.parameters(), lr=1e-2)
    captured: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []  # (per-example grads, parameters) per step
    with watch(model, loss_reduction=loss_reduction) as w:
        for batch in batches:
            optimizer.zero_grad()
            _reduce(case.losses(batch), loss_reduction).backward()
            per_example = w.per_example_param_gradients()
            captured.append((per_example, {k: v.clone() for k, v in model.state_dict().items()}))
            combined = {name: g.sum(0) if loss_reduction == "sum" else g.mean(0) for name, g in per_example.items()}
            assert_close_mapping(
                combined,
                {name: p.grad for name, p in model.named_parameters()},
                rtol=RTOL,
                atol_scale=ATOL_SCALE,
                what=f"{loss_reduction} of per-example vs .grad",
            )
            optimizer.step()
        assert w.steps == len(batches)

    # Each step's captures equal the oracle at that step's parameters (the oracle runs outside the watch).
    at_step = copy.deepcopy(model)
    for step, (batch, (per_example, params)) in enumerate(zip(batches, captured, strict=True)):
        at_step.load_state_dict(params)
        oracle = func_per_example_grads(at_step, case.loss_fn, batch)
        assert_close_mapping(per_example, oracle, rtol=RTOL, atol_scale=ATOL_SCALE, what=f"step {step} vs oracle")

    # The same loop without the watch ends at bitwise the same parameters: the hooks change nothing.
    twin_optimizer = torch_optimizer.Lamb(twin.parameters(), lr=1e-2)
    for batch in batches:
        twin_optimizer.zero_grad()
        _reduce(case.loss_fn(twin, batch), loss_reduction).backward()
        twin_optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(model.fc.weight, MODEL_CASES["conv2d"]().model.fc.weight)  # it did train


# ================================================================================================ known gaps
# Tied weights and a model whose only tracked layer never fires (gaps found while writing this suite).


class _TiedLinears(nn.Module):
    """An autoencoder whose decoder reuses the encoder's weight (two tracked Linears share one Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6, bias=False)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(x)))


def _tied_case(kind: str) -> tuple[ModelCase, tuple[str, str]]:
    """The case and the qualified names of the two modules holding the shared weight."""
    if kind == "gpt2-lm-head":
        # GPT-2 ties lm_head.weight to transformer.wte.weight, an nn.Embedding that hookinf cannot track.
        case = dataclasses.replace(MODEL_CASES["gpt2-conv1d"](), modules=None)
        return case, ("lm_head", "transformer.wte")
    with seeded(15):
        model = _TiedLinears().to(DTYPE)
        x = torch.randn(4, 6, dtype=DTYPE)
    case = ModelCase("tied-linears", model, (x,), lambda m, b: m(b[0]).pow(2).sum(1), lambda seed: (x,))
    return case, ("enc", "dec")


@pytest.mark.parametrize("kind", ["gpt2-lm-head", "linear-linear"])
def test_tied_weights_are_not_silently_partial(kind: str) -> None:
    """A Parameter shared by a tracked module and another module must not get a gradient of one use only.

    The watch only sees the tracked module's use of the shared weight. It must either refuse (naming both holders)
    or report, under every returned name of that Parameter, its full gradient; a gradient that silently misses the
    other use would make every influence score through this layer wrong.
    """
    case, holders = _tied_case(kind)
    model = case.model
    assert model.get_submodule(holders[0]).weight is model.get_submodule(holders[1]).weight
    refusal = ""
    try:
        got = _capture(case, loss_reduction="sum")
    except HookinfError as err:
        refusal = str(err)
    if refusal:
        for holder in holders:
            assert holder in refusal, refusal
        return
    oracle = _tracked_oracle(model, got, case.oracle())
    assert_close_mapping(got, oracle, rtol=RTOL, atol_scale=ATOL_SCALE, what=kind)


def test_bare_multihead_attention_names_out_proj() -> None:
    """A model whose only tracked layer never fires: the error must still name the layer, not claim no backward ran."""
    with seeded(13):
        model = nn.MultiheadAttention(8, 2, batch_first=True).to(DTYPE)
    x = torch.randn(3, 5, 8, dtype=DTYPE)
    assert watch(model).layers == ("out_proj",)

    def run() -> None:
        with watch(model) as w:
            model(x, x, x)[0].pow(2).sum().backward()
            w.per_example_param_gradients()

    with pytest.raises(CaptureError) as info:
        run()
    _assert_error(info, CaptureError, "'out_proj'")


def test_default_selection_leaves_out_a_tied_layer_with_a_warning() -> None:
    case, _ = _tied_case("gpt2-lm-head")
    with pytest.warns(HookinfWarning, match=r"'lm_head' shares a trainable parameter with 'transformer.wte'"):
        layers = watch(case.model).layers
    assert "lm_head" not in layers
    assert layers  # the Conv1D layers are still tracked
    with pytest.raises(UnsupportedModuleError) as info:
        watch(case.model, modules=["lm_head"])
    _assert_error(info, UnsupportedModuleError, "'lm_head'", "'transformer.wte'")


def test_torch_func_inside_an_active_watch_is_ignored_by_the_hooks() -> None:
    """A user's own torch.func oracle may run inside the block: its vmapped tensors are not captured."""
    case = MODEL_CASES["mlp-bias"]()
    expected = case.oracle()
    with watch(case.model, loss_reduction="sum") as w:
        inside = func_per_example_grads(case.model, case.loss_fn, case.batch)
        case.losses().sum().backward()
        got = w.per_example_param_gradients()
    assert w.steps == 1
    assert_close_mapping(inside, expected, rtol=RTOL, atol_scale=ATOL_SCALE, what="oracle inside watch")
    assert_close_mapping(got, expected, rtol=RTOL, atol_scale=ATOL_SCALE, what="capture")


def test_a_deep_copy_made_inside_the_block_does_not_disturb_the_watch() -> None:
    """copy.deepcopy(model) inside the block (EMA twins, checkpoints) is a model of its own, never captured."""
    case = MODEL_CASES["mlp-bias"]()
    expected = case.oracle()
    with watch(case.model, loss_reduction="sum") as w:
        twin = copy.deepcopy(case.model)
        with watch(twin, loss_reduction="sum") as inner:
            case.loss_fn(twin, case.batch).sum().backward()
            twin_grads = inner.per_example_param_gradients()
        case.losses().sum().backward()
        got = w.per_example_param_gradients()
        assert w.steps == 1
    case.model.zero_grad(set_to_none=True)
    assert_close_mapping(got, expected, rtol=RTOL, atol_scale=ATOL_SCALE, what="original")
    assert_close_mapping(twin_grads, expected, rtol=RTOL, atol_scale=ATOL_SCALE, what="twin")
    twin(case.batch[0])


@pytest.mark.parametrize("options", [{}, {"fit": "kfac"}, {"log_to": True, "compress": hookinf.LoGra(2, 2)}])
def test_a_deep_copy_made_inside_the_block_carries_no_hook_and_pickles(tmp_path: Path, options: dict) -> None:
    """The copy holds no hookinf hook (no closure over the watch): pickle and torch.save work, inside and after."""
    case = MODEL_CASES["conv2d"]()
    if options.get("log_to"):
        options = {**options, "log_to": tmp_path / "store"}
    with watch(case.model, **options) as w:
        if options.get("log_to"):
            w.tag(range(case.batch_size))
        case.losses().mean().backward()
        twin = copy.deepcopy(case.model)
        for module in twin.modules():
            hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
            assert not any(hooks), module
        pickle.dumps(twin)
        torch.save(twin, tmp_path / "inside.pt")
        twin(case.batch[0]).sum().backward()  # the twin's steps are not the watch's
        assert w.steps == 1
    torch.save(twin, tmp_path / "after.pt")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in case.model.modules())


def test_forwards_without_backward_do_not_pile_up_activations() -> None:
    """Grad-enabled forwards with no backward (an evaluation pass) must not keep their activations alive."""
    case = MODEL_CASES["mlp-bias"]()
    with watch(case.model, loss_reduction="sum") as w:
        for _ in range(20):
            case.losses()  # forward only, grad enabled
        assert len(w._pending.calls) <= len(w.layers)  # only the latest forward's calls are held
        case.losses().sum().backward()
        assert w.steps == 1


# ---------------------------------------------------------------------------------------------------- mixed precision
# Under autocast the forward runs in bfloat16 / float16, so every captured factor carries that precision's rounding,
# accumulated through the layers: about 2⁻⁸ (bfloat16) or 2⁻¹¹ (float16) relative per operation, a few operations
# deep. 4 units of the precision, relative to the layer's largest entry, bounds what a 2-block GPT-2 shows (measured:
# 0.6 % for bfloat16, 0.07 % for float16) and still catches a wrong scale, transpose or dropped factor (≥ 100 %).
AUTOCAST_TOL = {torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11}


def _autocast_gpt2() -> tuple[nn.Module, Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    with seeded(0):
        config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16, tie_word_embeddings=False)
        model = GPT2LMHeadModel(config).eval()  # eval: no dropout, the same function in every run
        ids = torch.randint(0, 50, (3, 8))
    return model, ids


def _autocast_step(model: nn.Module, ids: Tensor, dtype: torch.dtype | None) -> None:
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(input_ids=ids).logits
    F.cross_entropy(logits.float().reshape(-1, 50), ids.reshape(-1), reduction="sum").backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_capture_under_autocast_matches_float32_on_a_sequence_model(dtype: torch.dtype, tmp_path: Path) -> None:
    """Sequence inputs (S > 1) under autocast: float32 layers get low-precision inputs and output gradients."""
    model, ids = _autocast_gpt2()
    grads: dict[str, dict[str, Tensor]] = {}
    stores: dict[str, hookinf.GradientStore] = {}
    for label, precision in (("float32", None), ("autocast", dtype)):
        with watch(model, loss_reduction="sum") as w:
            _autocast_step(model, ids, precision)
            grads[label] = w.per_example_gradients()
        logged = watch(model, loss_reduction="sum", log_to=tmp_path / label, compress=hookinf.LoGra(4, 4), fit="kfac")
        with logged as w:
            w.tag(range(3))
            _autocast_step(model, ids, precision)
        stores[label] = w.store
        assert torch.isfinite(w.curvature().stat(w.layers[0], "A")).all()
    assert len(grads["float32"]) == 9  # 2 blocks × (c_attn, c_proj, c_fc, c_proj) + lm_head
    tol = AUTOCAST_TOL[dtype]
    for layer, expected in grads["float32"].items():
        got = grads["autocast"][layer]
        assert got.dtype == torch.float32, layer  # the weight's dtype, not autocast's
        close(got, expected, tol, f"{dtype}/{layer}")
    (_, stored32), (_, stored) = next(iter(stores["float32"].chunks())), next(iter(stores["autocast"].chunks()))
    for layer, expected in stored32.items():
        close(stored[layer].float(), expected.float(), tol, f"{dtype}/stored/{layer}")


def test_the_default_selection_says_which_trainable_parameters_it_leaves_out() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    with pytest.warns(hookinf.HookinfWarning, match=r"leaves out 2 module\(s\) holding 48 trainable parameters") as w:
        hookinf.watch(model)
    message = str(w[0].message)
    assert "'0' (Embedding, 40)" in message
    assert "'1' (LayerNorm, 8)" in message
    assert "(76.2% of them)" in message  # 48 of the 63 trainable parameters (the Linear holds 15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hookinf.watch(model, modules=["2"])  # named layers: the user chose, no warning
        model[0].weight.requires_grad_(False)
        model[1].requires_grad_(False)
        hookinf.watch(model)  # nothing trainable left out: no warning


# ---------------------------------------------------------------------------------------------------- deferred patches
class _CountIm2col(TorchDispatchMode):
    """Counts aten's im2col (what F.unfold runs) on real tensors: each one forms a convolution's patches.

    (The watch checks an input's shape with the adapter's map of a meta copy, which computes nothing.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket is torch.ops.aten.im2col and args[0].device.type != "meta":
            self.count += 1
        return func(*args, **(kwargs or {}))


def _conv_model() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(DTYPE)
    return model, torch.randn(5, 3, 6, 6, dtype=DTYPE), torch.randint(0, 3, (5,))


def test_a_bare_watch_unfolds_no_patch_until_the_step_is_read() -> None:
    model, x, y = _conv_model()
    counter = _CountIm2col()
    with watch(model, modules=["0", "3"]) as w:
        with counter:
            F.cross_entropy(model(x), y).backward()
        assert counter.count == 0  # forward and backward formed no patches
        with counter:
            grads = w.per_example_param_gradients()
        assert counter.count == 1  # reading the step formed the convolution's, once
    expected = func_per_example_grads(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), (x, y))
    for name, value in expected.items():
        close(grads[name], value, 1e-10, name)


def test_a_reused_input_buffer_is_refused_by_a_bare_watch_and_fine_with_a_consumer() -> None:
    model, x, y = _conv_model()
    buffer = x.clone()
    with watch(model, modules=["0", "3"]) as w:
        F.cross_entropy(model(buffer), y).backward()
        buffer.copy_(torch.randn_like(buffer))  # the next batch written into the same buffer before the step is read
        with pytest.raises(CaptureError, match=r"layer '0': its input was modified in place after the backward"):
            w.per_example_gradients()
    model.zero_grad(set_to_none=True)
    fitted = []
    for data in (x.clone(), None):
        buffer = x.clone() if data is None else data
        with watch(model, modules=["0", "3"], fit="kfac") as w:  # a consumer: the activations form in the backward
            F.cross_entropy(model(buffer), y).backward()
            if data is None:
                buffer.copy_(torch.randn_like(buffer))
        fitted.append(w.curvature())
        model.zero_grad(set_to_none=True)
    for key, value in fitted[0].tensors.items():
        assert torch.equal(fitted[1].tensors[key], value), key


@pytest.mark.parametrize("spatial", [1, 2])
def test_adapters_count_positions_without_forming_activations(spatial: int) -> None:
    """``positions(x)`` (what the forward hook checks) equals the activations' ``[B, S]`` and the output's size."""
    from hookinf.layers import adapter_for

    conv = nn.Conv2d if spatial == 2 else nn.Conv1d
    x = torch.randn(2, 3, *((9, 11) if spatial == 2 else (13,)))
    checked = 0
    for k, stride, dilation, padding, mode in itertools.product(
        (1, 3, 4), (1, 2), (1, 2), (0, 1, "same"), ("zeros", "reflect", "circular")
    ):
        if padding == "same" and stride != 1:
            continue
        module = conv(3, 4, k, stride=stride, dilation=dilation, padding=padding, padding_mode=mode)
        adapter = adapter_for("c", module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # 'same' with an even kernel: torch's note on a copy
            output = module(x)
        assert adapter.positions(x) == tuple(adapter.activations(x).shape[:2]), (k, stride, dilation, padding, mode)
        assert adapter.positions(x)[1] == output[0, 0].numel()
        checked += 1
    assert checked > 50
    linear = adapter_for("fc", nn.Linear(5, 4))
    for shape in ((6, 5), (6, 7, 5), (6, 2, 3, 5)):
        assert linear.positions(torch.randn(shape)) == tuple(linear.activations(torch.randn(shape)).shape[:2])
