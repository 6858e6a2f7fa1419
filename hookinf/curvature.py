"""``Curvature``: fitted, additive per-layer statistics that precondition gradients with ``(G_l + λ_l I)⁻¹``.

A curvature holds *sums* and *counts* (never averages), so fits over shards of the data merge by addition
(:meth:`Curvature.merge`), plus the damping rule. The damped factorisation each method needs (a Cholesky factor, an
eigendecomposition) is derived lazily and cached. Curvatures are saved as a directory holding one safetensors file
and a JSON manifest (:meth:`Curvature.save`, :func:`load`; see :mod:`hookinf.bundle`): the manifest is renamed last,
naming the tensor file by its content hash with its size and SHA-256, so an interrupted save leaves the previous
state or the new one, never a mix, and a damaged or edited save is refused when loaded.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from rich.console import Console, ConsoleOptions, RenderResult
from safetensors import SafetensorError
from torch import Tensor

from hookinf.bundle import load_bundle, save_bundle
from hookinf.compress import Compressor, from_config
from hookinf.damping import Damping
from hookinf.errors import CompressorMismatchError, ConfigurationError, CurvatureError
from hookinf.rich_text import Label, Table
from hookinf.shapes import LayerShape, fingerprint

FORMAT_VERSION = 1
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class LayerStatistics:
    """A method's typed, additive statistics of one layer: a frozen dataclass whose fields are all tensors.

    Each curvature type declares its own (``ExactStatistics``, ``KFACFactors``, ...). Saved files name a statistic
    ``"<layer>/<field>"``; that string is built when writing and reading, never parsed back.
    """

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The statistics' field names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    def tensors(self) -> dict[str, Tensor]:
        """Field name → tensor."""
        return {name: getattr(self, name) for name in self.names()}

    def plus(self, other: Self) -> Self:
        """The sum of two layers' statistics, field by field (statistics are sums)."""
        tensors = self.tensors().items()
        return replace(self, **{name: value + getattr(other, name).to(value.device) for name, value in tensors})

    @classmethod
    def read(cls, tensors: Mapping[str, Tensor], layer: str) -> Self:
        """The statistics of ``layer`` from a flat ``"<layer>/<field>"`` mapping (a saved file)."""
        missing = [f"{layer}/{name}" for name in cls.names() if f"{layer}/{name}" not in tensors]
        if missing:
            raise CurvatureError(f"the curvature is missing statistics {missing[:3]}.")
        return cls(**{name: tensors[f"{layer}/{name}"] for name in cls.names()})


class Curvature(ABC):
    """Fitted per-layer curvature of one method; applies ``(G_l + λ_l I)⁻¹`` to gradient matrices.

    Args:
        layers: layer name → shape, in model order.
        damping: the damping rule (``λ_l`` is derived from the statistics).
        num_examples: number of training examples the statistics sum over.
        state: layer name → the method's additive statistics of that layer (its :attr:`statistics_type`).
        compressor: the compressor whose space the statistics were accumulated in (``None``: uncompressed); it
            must be the one used with the curvature, and curvatures merge only in the same space.
    """

    #: the method's name (``"exact"``, ``"kfac"``, ...); also the key used to load a saved curvature.
    method: ClassVar[str]
    #: the type of each layer's statistics.
    statistics_type: ClassVar[type[LayerStatistics]]
    _registry: ClassVar[dict[str, type[Curvature]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:
            Curvature._registry[cls.method] = cls

    def __init__(
        self,
        layers: Mapping[str, LayerShape],
        damping: Damping,
        num_examples: int,
        state: Mapping[str, LayerStatistics],
        compressor: Compressor | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.damping = damping
        self.num_examples = int(num_examples)
        self.state = dict(state)
        self.compressor = compressor
        self._cache: dict[str, Any] = {}
        self._on_device: dict[tuple[str, torch.device], Any] = {}
        wrong = [n for n in self.layers if not isinstance(self.state.get(n), self.statistics_type)]
        if wrong or set(self.state) != set(self.layers):
            raise CurvatureError(
                f"{self.method} curvature: every layer needs its {self.statistics_type.__name__}; layers "
                f"{(wrong or sorted(set(self.state) ^ set(self.layers)))[:3]} have none."
            )

    # ------------------------------------------------------------------ the maths, per method
    @abstractmethod
    def _prepare(self, layer: str) -> Any:
        """Derives what :meth:`_apply` needs for one layer (factorisation, ``λ_l``); cached."""

    @abstractmethod
    def _apply(self, prepared: Any, grads: Tensor) -> Tensor:
        """``(G_l + λ_l I)⁻¹`` on ``[N, O, I]`` float64 gradients."""

    @abstractmethod
    def _lambda(self, prepared: Any) -> float:
        """``λ_l`` of a prepared layer."""

    @abstractmethod
    def _eigen_range(self, layer: str) -> tuple[float, float]:
        """Smallest and largest eigenvalue of the (undamped) approximate block (for the summary table)."""

    # ------------------------------------------------------------------ public use
    def apply(self, layer: str, grads: Tensor) -> Tensor:
        """Applies ``(G_l + λ_l I)⁻¹`` to per-example gradients.

        Args:
            layer: layer name.
            grads: ``[N, O, I]`` gradient matrices.

        Returns:
            ``[N, O, I]`` in :meth:`compute_dtype` (float64, or float32 for Kronecker curvatures of float32 models).
        """
        return self._apply(self._prepared_on(layer, grads.device), grads.to(self.compute_dtype(layer)))

    def compute_dtype(self, layer: str) -> torch.dtype:
        """The dtype :meth:`apply` works (and returns) in: float64 unless a method says otherwise."""
        return torch.float64

    @property
    def lambdas(self) -> dict[str, float]:
        """``λ_l`` per layer, as used by :meth:`apply`."""
        return {name: self._lambda(self._prepared(name)) for name in self.layers}

    def with_damping(self, damping: Damping) -> Self:
        """The same statistics under another damping rule (cheap: only the factorisation is redone)."""
        return type(self)(self.layers, damping, self.num_examples, self.state, self.compressor)

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Every statistic, flat: ``"<layer>/<field>"`` → tensor (the form a saved file holds)."""
        return {
            f"{layer}/{key}": value for layer, stats in self.state.items() for key, value in stats.tensors().items()
        }

    @property
    def extra(self) -> dict[str, Any]:
        """What the manifest records beside the statistics: the compressor's configuration, when there is one."""
        return {} if self.compressor is None else {"compressor": self.compressor.config()}

    def check_compressor(self, compressor: Compressor | None, subject: str = "this curvature") -> None:
        """Refuses use in another compressed space (or none) than the one the statistics were accumulated in.

        Raises:
            CompressorMismatchError: names both compressors.
        """
        if compressor != self.compressor:
            fitted = None if self.compressor is None else self.compressor.config()
            used = None if compressor is None else compressor.config()
            raise CompressorMismatchError(
                f"{subject} ({self.method}) was fitted with compress={fitted} but is used with compress={used}; pass "
                f"the compressor {subject} was fitted with (the same compressor, with the same seed)."
            )

    def _prepared_on(self, layer: str, device: torch.device) -> Any:
        """:meth:`_prepared` with its tensors on ``device``, cached per device.

        A curvature loaded on the CPU serves gradients on an accelerator, and each layer of a model split over devices
        is served where it lives.
        """
        key = (layer, device)
        if key not in self._on_device:
            self._on_device[key] = to_device(self._prepared(layer), device)
        return self._on_device[key]

    def _prepared(self, layer: str) -> Any:
        if layer not in self.layers:
            raise CurvatureError(f"this {self.method} curvature has no layer '{layer}'; it has {list(self.layers)}.")
        if layer not in self._cache:
            self._cache[layer] = self._prepare(layer)
        return self._cache[layer]

    def stat(self, layer: str, name: str) -> Tensor:
        """One statistic of one layer (a field of its :attr:`statistics_type`)."""
        value: Tensor = getattr(self.state[layer], name)
        return value

    def check_compatible(self, shapes: Mapping[str, LayerShape]) -> None:
        """Refuses a model whose tracked layers differ from the ones this curvature was fitted on.

        Raises:
            CurvatureError: names the first layer that is missing, extra or of another shape.
        """
        for name, shape in shapes.items():
            if name not in self.layers:
                raise CurvatureError(
                    f"layer '{name}' of the model is not in this {self.method} curvature (fitted on "
                    f"{list(self.layers)}); refit, or track the same layers with modules=."
                )
            if self.layers[name] != shape:
                raise CurvatureError(
                    f"layer '{name}' has gradient shape {shape.out_features}×{shape.in_features} in the model but "
                    f"{self.layers[name].out_features}×{self.layers[name].in_features} in this {self.method} "
                    f"curvature: it was fitted on a different model. Refit it."
                )
        extra = [name for name in self.layers if name not in shapes]
        if extra:
            raise CurvatureError(
                f"this {self.method} curvature has layer '{extra[0]}', which the model does not track; track the same "
                f"layers (modules={list(self.layers)}) or refit."
            )

    # ------------------------------------------------------------------ merge
    def merge(self, other: Curvature) -> Self:
        """Statistics of both fits, as if fitted on the union of their data (sums and counts add)."""
        if type(other) is not type(self):
            raise CurvatureError(f"cannot merge a {other.method} curvature into a {self.method} curvature.")
        self._check_mergeable(other)
        state = {name: stats.plus(other.state[name]) for name, stats in self.state.items()}
        return type(self)(self.layers, self.damping, self.num_examples + other.num_examples, state, self.compressor)

    def _check_mergeable(self, other: Curvature) -> None:
        if other.compressor != self.compressor:
            raise CompressorMismatchError(
                f"cannot merge a {self.method} curvature fitted with compress="
                f"{None if self.compressor is None else self.compressor.config()} and one fitted with compress="
                f"{None if other.compressor is None else other.compressor.config()}: their statistics live in "
                f"different spaces. Fit every part with the same compressor (and seed)."
            )
        if other.layers != self.layers:
            raise CurvatureError("cannot merge curvatures fitted on different layers or layer shapes.")
        if other.damping != self.damping:
            raise CurvatureError(f"cannot merge curvatures with different damping ({self.damping} vs {other.damping}).")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Saves to the directory ``path`` (created when missing), all-or-nothing; returns the path.

        The tensors go to a file named by their hash and the manifest, naming it with its size and SHA-256, replaces
        the previous one in one rename (see :mod:`hookinf.bundle`): a save killed at any point leaves the previous
        curvature or this one, never a mix; :func:`load` checks both files.

        Raises:
            CurvatureError: the directory or a file in it cannot be written (names the directory; chained from the
                ``OSError``). The directory keeps what it held before.
        """
        directory = Path(path)
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.tensors.items()}
        fields = {
            "format": "hookinf.curvature",
            "version": FORMAT_VERSION,
            "method": self.method,
            "damping": {"relative": self.damping.relative, "absolute": self.damping.absolute},
            "num_examples": self.num_examples,
            "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None,
            "layers": {name: shape.to_json() for name, shape in self.layers.items()},
            "fingerprint": fingerprint(self.layers),
            "compressor": None if self.compressor is None else self.compressor.config(),
        }
        try:
            save_bundle(directory, "curvature", tensors, fields)
        except (OSError, ValueError) as err:
            cause = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise CurvatureError(
                f"{directory}: cannot save the {self.method} curvature ({cause}); the directory keeps what it held "
                f"before. Fix the cause (e.g. free disk space) and save again."
            ) from err
        return directory

    # ------------------------------------------------------------------ display
    def summary_table(self) -> Table:
        """Per layer: shape, positions (tokens/patches) seen, ``λ_l``, eigenvalue range, damped condition number."""
        table = Table(title=f"{self.method} curvature over {self.num_examples} examples ({self.damping} damping)")
        for column in ("layer", "O×I", "d", "positions", "λ", "eigenvalues", "condition (damped)"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for name, shape in self.layers.items():
            low, high = self._eigen_range(name)
            lam = self._lambda(self._prepared(name))
            cond = (high + lam) / (low + lam) if low + lam > 0 else math.inf
            table.add_row(
                Label(name or "<model>"),  # long (LoRA) names are cut in the middle: their distinguishing ends stay
                f"{shape.out_features}×{shape.in_features}",
                str(shape.dim),
                f"{int(self.stat(name, 'positions')):,}" if "positions" in self.statistics_type.names() else "—",
                f"{lam:.3g}",
                f"[{low:.2e}, {high:.2e}]",
                f"{cond:.3g}",
            )
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.summary_table()

    def __repr__(self) -> str:
        console = Console(width=120, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed by Console
        console.print(self.summary_table())
        return console.export_text().rstrip()


def to_device(prepared: Any, device: torch.device) -> Any:
    """A prepared factorisation (a dataclass of tensors and numbers, or ``None``) with its tensors on ``device``."""
    if prepared is None or not is_dataclass(prepared) or isinstance(prepared, type):
        return prepared
    moved = {f.name: getattr(prepared, f.name) for f in fields(prepared)}
    return replace(prepared, **{k: v.to(device) for k, v in moved.items() if isinstance(v, Tensor)})


def statistics_dtype(params: Iterable[Tensor], dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype statistics accumulate in: ``dtype`` if given, else float64 for a float64 model, else float32.

    Low-precision covariances (bf16/fp16) give broken eigenvectors, so statistics never accumulate below float32.
    """
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ConfigurationError(f"dtype={dtype} for statistics must be torch.float32 or torch.float64.")
        return dtype
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def load(path: str | os.PathLike[str]) -> Curvature:
    """Loads a curvature saved by :meth:`Curvature.save`, checking its files first.

    The manifest must match its checksum and the tensor file its recorded size and SHA-256 (curvatures saved before
    checksums were recorded: the hash in the tensor file's name), so a damaged or edited save is refused.

    Raises:
        CurvatureError: the directory holds no curvature, or a damaged or edited one (the message names the file).
    """
    directory = Path(path)
    manifest_path = directory / _MANIFEST
    if not manifest_path.is_file():
        raise CurvatureError(f"{directory}: no hookinf curvature here (missing {_MANIFEST}).")
    try:
        bundle = load_bundle(directory, "hookinf.curvature", "curvature")
        manifest, tensors = bundle.manifest, bundle.tensors
        cls = Curvature._registry[manifest["method"]]
        layers = {name: LayerShape.from_json(data) for name, data in manifest["layers"].items()}
        damping = Damping(**manifest["damping"])
        num_examples = int(manifest["num_examples"])
        # format 1 files written before the compressor was a field of its own keep it under "extra"
        config = manifest["compressor"] if "compressor" in manifest else manifest.get("extra", {}).get("compressor")
        compressor = None if config is None else from_config(config)
        state = {name: cls.statistics_type.read(tensors, name) for name in layers}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, CurvatureError, ConfigurationError) as err:
        raise CurvatureError(f"{directory}: corrupt hookinf curvature ({type(err).__name__}: {err}).") from err
    return cls(layers, damping, num_examples, state, compressor)
