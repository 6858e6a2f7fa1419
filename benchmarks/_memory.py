"""Memory and host-read counters shared by the benchmarks.

Resident memory (Linux /proc, with a getrusage fallback), the peak live tensor memory of a block (``LiveBytes``) and
its device-to-host reads (``HostReads``), both counted with a ``TorchDispatchMode``.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


def rss_mib() -> float:
    """Resident set size now (Linux /proc; elsewhere the peak so far, which understates later growth)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_mib()


def peak_mib() -> float:
    """Peak resident set size of this process image.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``, which survives ``fork`` + ``exec``: a worker
    started by a parent holding 1 GiB would report a 1 GiB peak however little it used itself.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the block and alive at once (a CPU stand-in for
    ``torch.cuda.max_memory_allocated``: the tensors an accelerator would hold, without the allocator's caching).

    Every op output that does not alias an input is a new storage; it counts until it is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if len(self.live) > 64:  # prune freed storages now and then, not at every op
            self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        results = out if isinstance(out, tuple | list) else (out,)
        for ret, result in zip(func._schema.returns, results, strict=False):
            if ret.alias_info is not None:
                continue  # a view or an in-place result: no new storage
            for tensor in pytree.tree_leaves(result):
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(n for ref, n in self.live.values() if not ref.expired()))
        return out


class HostReads(TorchDispatchMode):
    """Counts the aten calls that read a tensor's value on the host (each one a synchronisation on a GPU)."""

    NAMES = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "equal"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func.overloadpacket.__name__ in self.NAMES
        return func(*args, **(kwargs or {}))
