"""Checkpoint sources: what ``checkpoints=[...]`` accepts, read into state dicts of tensors on the host.

A checkpoint is the weights of the same architecture at some point of training. It may be given as

* a state dict (``{name: tensor}``): ``model.state_dict()``, or only the trainable / tracked parameters (a LoRA
  checkpoint is a few MB), e.g. a :class:`hookinf.Snapshots` entry;
* a file saved with ``torch.save`` (read with ``weights_only=True``: no code runs) or a ``.safetensors`` file;
* a Hugging Face ``Trainer`` ``checkpoint-N/`` directory (or any ``save_pretrained`` directory): ``model.safetensors``,
  ``pytorch_model.bin``, either sharded (``*.index.json``), or a PEFT adapter
  (``adapter_model.safetensors`` / ``adapter_model.bin``), whose saved names (no adapter name,
  ``modules_to_save`` unwrapped) are mapped onto the peft model's own state-dict names by peft's
  ``set_peft_model_state_dict`` itself (see :func:`_peft_names`).

Names are the model's ``state_dict()`` keys (parameters and persistent buffers); :mod:`hookinf.loaded_checkpoint` checks
them against the model and loads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from hookinf.errors import CheckpointError

CheckpointSource = Mapping[str, Tensor] | str | os.PathLike[str]
"""One checkpoint: a state dict, a ``torch.save`` / ``.safetensors`` file, or a Hugging Face checkpoint directory."""

_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def describe(source: CheckpointSource, index: int) -> str:
    """How errors name checkpoint ``index``: ``checkpoints[2] ('run/checkpoint-300')``, or its size for a dict."""
    if isinstance(source, Mapping):
        return f"checkpoints[{index}] (a state dict of {len(source)} tensors)"
    return f"checkpoints[{index}] ({os.fspath(source)!r})"


def check_source(source: object, what: str) -> None:
    """Refuses, before any pass runs, a source that is neither a state dict nor an existing file or directory."""
    if isinstance(source, Mapping):
        return
    if not isinstance(source, str | os.PathLike):
        raise CheckpointError(
            f"{what}: a checkpoint is a state dict, a path to a torch.save or .safetensors file, or a Hugging Face "
            f"checkpoint directory; got {type(source).__name__}."
        )
    if not Path(source).exists():
        raise CheckpointError(f"{what}: no such file or directory.")


def read_checkpoint(source: CheckpointSource, model: nn.Module, what: str) -> dict[str, Tensor]:
    """The checkpoint's tensors under the model's state-dict names (files are read to the CPU).

    Args:
        source: a state dict, a file or a Hugging Face checkpoint directory (see the module docstring).
        model: the architecture the names are for (needed only to map a PEFT adapter's saved names).
        what: how errors name the checkpoint (see :func:`describe`).

    A checkpoint saved from a ``DistributedDataParallel`` wrapper (names ``module.…``) is read under the inner
    model's names.

    Raises:
        CheckpointError: the source cannot be read or holds something other than named tensors.
    """
    check_source(source, what)
    if isinstance(source, Mapping):
        tensors = _tensors(source, what)
    elif Path(source).is_dir():
        tensors = _read_directory(Path(source), model, what)
    else:
        tensors = _read_file(Path(source), what)
    return _without_wrapper_prefix(tensors, model)


_WRAPPER_PREFIX = "module."  # what DistributedDataParallel / DataParallel put before the inner model's names


def _without_wrapper_prefix(tensors: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A checkpoint saved from a ``DistributedDataParallel`` wrapper (``module.…`` names) under the inner model's.

    Only when every name has the prefix and ``model`` (the inner model hookinf works on, see
    :func:`hookinf.distributed.unwrap`) has none.
    """
    if not tensors or not all(name.startswith(_WRAPPER_PREFIX) for name in tensors):
        return tensors
    if any(name.startswith(_WRAPPER_PREFIX) for name in model.state_dict()):
        return tensors  # the model itself names things module.… (a wrapper, or an attribute called module)
    return {name[len(_WRAPPER_PREFIX) :]: value for name, value in tensors.items()}


def _read_directory(path: Path, model: nn.Module, what: str) -> dict[str, Tensor]:
    found = [name for name in (*_MODEL_FILES, *_ADAPTER_FILES) if (path / name).is_file()]
    if not found:
        raise CheckpointError(
            f"{what}: a directory with none of {', '.join((*_MODEL_FILES, *_ADAPTER_FILES))} (a Hugging Face "
            f"checkpoint-N/ directory holds one of them); pass the file itself if the weights are saved under "
            f"another name."
        )
    name = found[0]
    if name.endswith(".index.json"):
        return _read_sharded(path / name, what)
    tensors = _read_file(path / name, what)
    if name in _ADAPTER_FILES:
        return _peft_names(model, tensors, what)
    return tensors


def _read_file(path: Path, what: str) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{what}: {path} is not a readable safetensors file ({err}).") from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refusals, truncation and zip errors all mean the same to the user
        raise CheckpointError(
            f"{what}: {path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: {err}); "
            f"save a state dict of tensors (torch.save(model.state_dict(), path)) or a .safetensors file."
        ) from err
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{what}: {path} holds a {type(loaded).__name__}, not a state dict of tensors.")
    return _tensors(loaded, f"{what} ({path})")


def _read_sharded(index: Path, what: str) -> dict[str, Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{what}: {index} is not a safetensors index with a 'weight_map' ({err}).") from err
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors.update(_read_file(index.parent / file, what))
    return tensors


def _tensors(state: Mapping[Any, Any], what: str) -> dict[str, Tensor]:
    bad = [repr(key) for key, value in state.items() if not isinstance(key, str) or not isinstance(value, Tensor)]
    if bad:
        nested = [key for key, value in state.items() if isinstance(value, Mapping)]
        hint = f" (a nested dict under {nested[0]!r}: pass that entry)" if nested else ""
        raise CheckpointError(
            f"{what}: a state dict maps names to tensors; {', '.join(bad[:3])} {'is' if len(bad) == 1 else 'are'} "
            f"not a name with a tensor{hint}."
        )
    return dict(state)


def _peft_names(model: nn.Module, saved: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """A PEFT adapter's saved tensors under the model's state-dict names, as peft itself maps them.

    peft saves ``...lora_A.weight`` for the model's ``...lora_A.default.weight`` (the adapter name is inserted when
    loading) and unwraps ``modules_to_save``; the mapping depends on the tuner and the peft version, so it is not
    rewritten here: ``peft.set_peft_model_state_dict`` runs with a load-state-dict pre-hook on the model that takes
    the mapped dict and empties it, so nothing is loaded (the hook is removed at once).
    """
    config = getattr(model, "peft_config", None)
    if not isinstance(config, Mapping) or not config:
        raise CheckpointError(
            f"{what} is a PEFT adapter, but the model has no PEFT adapters: pass the peft model (get_peft_model(...) "
            f"or PeftModel.from_pretrained(...)) whose adapter this checkpoint holds."
        )
    try:
        from peft import set_peft_model_state_dict
    except ImportError as err:  # pragma: no cover - a model with peft_config comes from peft
        raise CheckpointError(f"{what} is a PEFT adapter; reading it needs peft: pip install peft.") from err
    adapter = getattr(model, "active_adapter", None)
    adapter = adapter if isinstance(adapter, str) and adapter in config else next(iter(config))
    mapped: dict[str, Tensor] = {}

    def take(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        if prefix == "":
            mapped.update(state_dict)
            state_dict.clear()

    handle = model.register_load_state_dict_pre_hook(take)
    try:
        set_peft_model_state_dict(model, saved, adapter_name=adapter)
    except Exception as err:
        raise CheckpointError(f"{what}: peft cannot map the adapter onto the model ({err}).") from err
    finally:
        handle.remove()
    return mapped
