"""Device-to-host copies that overlap the training step: pinned buffers, a side stream and an event per copy.

A store's shards are written from the host. Copying a step's compressed gradients with ``tensor.cpu()`` on the
default stream blocks the training thread until every queued kernel has run and then copies through pageable
memory. :class:`HostCopier` instead enqueues each copy into a pinned host buffer with ``non_blocking=True`` on a
side stream of the tensor's device (after the kernels that produced the tensor), records an event, and returns at
once; whoever reads the host tensors (the store's writer thread) waits on that event first (:meth:`HostCopy.wait`).
Tensors on the host are passed through as they are; other accelerators (no CUDA streams) fall back to a blocking
copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class HostCopy:
    """Host tensors whose copies may still be in flight; :meth:`wait` before reading them.

    Attributes:
        tensors: name → host tensor (pinned when it came from a CUDA device).
        events: the CUDA events that mark the copies' completion (empty when nothing is in flight).
    """

    tensors: dict[str, Tensor]
    events: list[Any] = field(default_factory=list)

    def wait(self) -> dict[str, Tensor]:
        """Blocks until the copies have landed (this thread only) and returns the host tensors."""
        for event in self.events:
            event.synchronize()
        self.events.clear()
        return self.tensors


class HostCopier:
    """Enqueues copies of device tensors into pinned host memory on one side stream per CUDA device."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}

    def copy(self, tensors: Mapping[str, Tensor]) -> HostCopy:
        """Host copies of ``tensors``, enqueued without waiting (see the module docstring)."""
        out: dict[str, Tensor] = {}
        by_device: dict[torch.device, list[str]] = {}
        for name, tensor in tensors.items():
            if tensor.device.type == "cuda":
                by_device.setdefault(tensor.device, []).append(name)
            elif tensor.device.type in ("cpu", "meta"):
                out[name] = tensor
            else:
                out[name] = tensor.cpu()  # no CUDA stream to overlap on: a blocking copy
        events = []
        for device, names in by_device.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # after the kernels that produce the tensors
            with torch.cuda.stream(stream):
                for name in names:
                    tensor = tensors[name]
                    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
                    host.copy_(tensor, non_blocking=True)
                    tensor.record_stream(stream)  # its memory is not reused before the copy has read it
                    out[name] = host
                event = torch.cuda.Event()
                event.record(stream)
            events.append(event)
        return HostCopy({name: out[name] for name in tensors}, events)
