"""Sub-linear top-k: a FAISS inner-product index over a preconditioned store (optional: ``hookinf[faiss]``).

The total influence of training example ``j`` on query ``q`` is ``−Σ_l g_l(z_q)ᵀ p_l(z_j)`` with
``p_l = (G_l + λ_l I)⁻¹ g_l`` the preconditioned gradients of a :class:`~hookinf.PreconditionedStore`: one inner
product of the layers' vectors concatenated, ``−⟨g(z_q), p(z_j)⟩``. :class:`FaissIndex` holds the ``p(z_j)`` (float32)
in a FAISS index; the most harmful examples are the largest inner products with ``−g(z_q)``, the most helpful the
largest with ``g(z_q)`` (maximum inner product search). ``kind="ivf"`` (an inverted file of ``nlist`` k-means cells,
``nprobe`` of them searched per query) is approximate and sub-linear; ``kind="flat"`` is exact and linear (a
reference). ``benchmarks/retrieval.py`` measures the recall@k of ``ivf`` against exact streaming top-k.

:meth:`FaissIndex.save` writes one file atomically (a temporary file, fsynced and renamed over the target): the FAISS
index's own bytes (``faiss.write_index``, streamed), then a JSON record, then its length (8 bytes, little-endian)
and the 8-byte tag ``HKFAISS1``. The record (sealed by ``config_sha256``) holds the index's kind, rows and width,
the size and SHA-256 of the FAISS bytes, and the identity of the preconditioned store the index was built from: its
curvature's hash and method and its :class:`~hookinf.preconditioned_format.StoreIdentity` (rows, ids digest, shard
checksums). :meth:`FaissIndex.load` checks the file's SHA-256 before FAISS parses a byte, and refuses a store other
than that one (another curvature, other ids, or the same path written again), so an index never answers for
vectors it does not hold.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hookinf.compress import from_config
from hookinf.errors import ConfigurationError, DataError, StoreError
from hookinf.ids import Ids, sort_order, take
from hookinf.io import Sink, seal, write_atomically
from hookinf.preconditioned import PreconditionedStore
from hookinf.preconditioned_format import StoreIdentity
from hookinf.runner import LossFn, Runner, check_reiterable
from hookinf.scores import TopK
from hookinf.selection import ModuleSpec
from hookinf.shapes import fingerprint
from hookinf.weights import weights_hash

IndexKind = Literal["ivf", "flat"]
FORMAT = "hookinf.faiss-index"
TAG = b"HKFAISS1"
_TAIL = struct.Struct("<Q8s")  # the record's length, the tag
_CHUNK = 1 << 20


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:
        raise ConfigurationError("the FAISS index needs faiss: pip install 'hookinf[faiss]'.") from err
    return faiss


class FaissIndex:
    """An inner-product FAISS index over a preconditioned store's gradients, all layers concatenated.

    Build one with :meth:`build`, or :meth:`load` one that :meth:`save` wrote; rank queries with :meth:`top_k`
    (from data) or :meth:`search` (from vectors).

    Attributes:
        store: the preconditioned store it indexes.
        index: the FAISS index (rows in the store's storage order).
        kind: ``"ivf"`` or ``"flat"``.
        identity: the identity of the store's gradients the index holds (:meth:`PreconditionedStore.identity`).
    """

    def __init__(
        self, store: PreconditionedStore, index: Any, kind: IndexKind, identity: StoreIdentity | None = None
    ) -> None:
        self.store = store
        self.index = index
        self.kind = kind
        self.identity = identity or store.identity()
        ids = store.ids
        order = sort_order(ids)
        self._sorted: Ids = take(ids, order)
        self._column = torch.empty(len(store), dtype=torch.int64, device="cpu")
        self._column[order] = torch.arange(len(store), device="cpu")  # storage row → column (rank of its id)

    @classmethod
    def build(
        cls,
        store: PreconditionedStore,
        *,
        kind: IndexKind = "ivf",
        nlist: int | None = None,
        nprobe: int = 16,
        train_size: int = 65536,
        seed: int = 0,
    ) -> FaissIndex:
        """Reads the store's preconditioned gradients (float32) into a new index.

        Args:
            store: the preconditioned store.
            kind: ``"ivf"`` (approximate, sub-linear) or ``"flat"`` (exact, linear).
            nlist: k-means cells of ``"ivf"`` (default ``√n``, at least 39 training rows per cell).
            nprobe: cells searched per query (more: higher recall, slower).
            train_size: at most this many rows (drawn with ``seed``) train the k-means of ``"ivf"``.
            seed: seeds the rows drawn for training and the k-means.

        Raises:
            ConfigurationError: faiss is not installed, or an unknown ``kind``.
            DataError: the store is empty.
        """
        faiss = _faiss()
        if kind not in ("ivf", "flat"):
            raise ConfigurationError(f"kind={kind!r}: the index kinds are 'ivf' and 'flat'.")
        if not len(store):
            raise DataError(f"{store.path}: the store is empty; there is nothing to index.")
        parts = [torch.cat([g[n].float() for n in store.layers], dim=1) for _, g in store.chunks()]
        vectors = torch.cat(parts).numpy()
        del parts
        dim = int(vectors.shape[1])
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            cells = nlist or max(1, min(len(store) // 39, round(math.sqrt(len(store)))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            generator = torch.Generator().manual_seed(seed)
            rows = torch.randperm(len(store), generator=generator, device="cpu")[:train_size].sort().values.numpy()
            index.train(vectors[rows])
            index.nprobe = min(nprobe, cells)
        index.add(vectors)
        return cls(store, index, kind)

    def search(self, queries: Tensor, k: int = 10) -> TopK:
        """The ``k`` most harmful and most helpful training examples for raw query vectors.

        Args:
            queries: ``[n_query, D]``: each query's (compressed) gradients, layers concatenated in model order.
            k: entries per query and direction (at most the store's size).

        Returns:
            A :class:`~hookinf.TopK` whose columns and ids are those of :func:`hookinf.top_k` on the store.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"top_k(k={k!r}): k must be a positive integer.")
        k = min(k, len(self.store))
        vectors = queries.detach().float().cpu().contiguous()
        harmful_ip, harmful_rows = self.index.search((-vectors).numpy(), k)  # score = −⟨g, p⟩ = ⟨−g, p⟩
        helpful_ip, helpful_rows = self.index.search(vectors.numpy(), k)
        harmful = self._column[torch.from_numpy(harmful_rows).clamp(min=0)]  # −1 (not found) only past the store
        helpful = self._column[torch.from_numpy(helpful_rows).clamp(min=0)]
        return TopK(
            harmful, torch.from_numpy(harmful_ip), helpful, -torch.from_numpy(helpful_ip),
            self._ids_at(harmful), self._ids_at(helpful),
        )  # fmt: skip

    def top_k(
        self,
        model: nn.Module,
        query: Iterable[Any],
        loss_fn: LossFn,
        *,
        k: int = 10,
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        progress: bool = True,
    ) -> TopK:
        """:meth:`search` with the query gradients of ``query`` (taken as :func:`hookinf.top_k` takes them).

        Raises:
            StoreError: the model differs from the store's, or holds other weights than its gradients were taken at.
        """
        check_reiterable(query, "query")
        inner = self.store.gradients
        with Runner(model, loss_fn, modules=modules, compress=from_config(inner.compressor), progress=progress) as run:
            assert run.compressor is not None
            original = run.compressor.original
            inner.check(compressor=inner.compressor, original=original, fingerprint=fingerprint(original))
            inner.check_weights(weights_hash(run.params))
            raw = run.query_gradients(query)
        return self.search(torch.cat([raw[name].flatten(1) for name in inner.layers], dim=1), k)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the index to the file ``path`` atomically: a reader finds the old file or the new one, never a part.

        The file records the preconditioned store the index was built from (see the module docstring), so
        :meth:`load` refuses any other. Memory: none beyond FAISS's write buffers (the index streams to the file).

        Raises:
            StoreError: the file cannot be written (the message names it; a file at ``path`` is left as it was).
        """
        faiss = _faiss()
        target = Path(path)

        def write(sink: Sink) -> None:
            def chunk(data: bytes) -> int:
                sink.write(data)
                return len(data)

            faiss.write_index(self.index, faiss.PyCallbackIOWriter(chunk))
            written = sink.digest()
            fields = {
                "format": FORMAT,
                "version": 1,
                "kind": self.kind,
                "rows": int(self.index.ntotal),
                "dim": int(self.index.d),
                "faiss": {"size": written.size, "sha256": written.sha256},
                "store": {
                    "path": str(self.store.path),  # for reference only: a moved store is the same store
                    "method": self.store.record.method,
                    "curvature": self.store.record.curvature,
                    **self.identity.to_json(),
                },
            }
            record = json.dumps({**fields, "config_sha256": seal(fields)}, indent=1).encode("utf-8")
            sink.write(record)
            sink.write(_TAIL.pack(len(record), TAG))

        try:
            write_atomically(target, write)
        except OSError as err:
            raise StoreError(f"{target}: cannot save the FAISS index ({err.strerror or err}).") from err

    @classmethod
    def load(cls, path: str | os.PathLike[str], store: PreconditionedStore) -> FaissIndex:
        """Reads an index :meth:`save` wrote, for the very preconditioned store it was built from.

        Args:
            path: the file.
            store: the preconditioned store the index was built from (its vectors are not read).

        Raises:
            ConfigurationError: faiss is not installed.
            StoreError: no such file, not an index file, a damaged one (checksum), or ``store`` is not the store the
                index was built from: another curvature, other ids or rows, or other gradients under the same ids (the
                store was written again); the message names what differs.
        """
        faiss = _faiss()
        target = Path(path)
        try:
            with open(target, "rb") as handle:
                fields, size = _read_record(target, handle)
                _check_store(target, fields["store"], store)
                _check_digest(target, handle, size, fields["faiss"]["sha256"])
                index = faiss.read_index(faiss.PyCallbackIOReader(_reader(handle, size)))
        except OSError as err:
            raise StoreError(f"{target}: cannot read the FAISS index ({err.strerror or err}).") from err
        except RuntimeError as err:  # whole bytes this faiss cannot read (an index type of a newer faiss)
            raise StoreError(f"{target}: faiss {faiss.__version__} cannot read the index ({err}).") from err
        width = sum(shape.dim for shape in store.layers.values())
        if index.ntotal != len(store) or index.d != width or fields["kind"] not in ("ivf", "flat"):
            raise StoreError(
                f"{target}: the index holds {index.ntotal} rows × {index.d} ({fields['kind']!r}), not the store's "
                f"{len(store)} × {width}: the file is damaged. Build the index again and save it."
            )
        identity = StoreIdentity(fields["store"]["rows"], fields["store"]["ids"], fields["store"]["content"])
        return cls(store, index, fields["kind"], identity)

    def _ids_at(self, columns: Tensor) -> Tensor | list[list[str]]:
        if isinstance(self._sorted, Tensor):
            return self._sorted[columns]
        return [[self._sorted[j] for j in row] for row in columns.tolist()]

    def __repr__(self) -> str:
        return f"FaissIndex({self.kind}, {self.index.ntotal:,} rows × {self.index.d}, {self.store.path})"


def _read_record(target: Path, handle: Any) -> tuple[dict[str, Any], int]:
    """The sealed record at the end of an index file, and the size of the FAISS bytes before it.

    Raises:
        StoreError: not an index file (no tag), or a record that is malformed or edited against its checksum.
    """
    end = handle.seek(0, os.SEEK_END)
    if end < _TAIL.size:
        raise StoreError(f"{target}: not a hookinf FAISS index file ({end} bytes, too short). Save it with .save().")
    handle.seek(end - _TAIL.size)
    length, tag = _TAIL.unpack(handle.read(_TAIL.size))
    if tag != TAG or length > end - _TAIL.size:
        raise StoreError(f"{target}: not a hookinf FAISS index file (no {TAG.decode()} tag at its end).")
    size = end - _TAIL.size - length
    handle.seek(size)
    try:
        data = json.loads(handle.read(length).decode("utf-8"))
        fields = {key: value for key, value in data.items() if key != "config_sha256"}
        if fields.get("format") != FORMAT or fields.get("version") != 1:
            raise ValueError(f"format {fields.get('format')!r} version {fields.get('version')!r}, not {FORMAT!r} 1")
        if data.get("config_sha256") != seal(fields):
            raise ValueError("the record does not match its checksum config_sha256: it was edited or damaged")
        if fields["faiss"]["size"] != size:
            raise ValueError(f"{size} bytes of index, not the {fields['faiss']['size']} recorded")
        StoreIdentity.parse({key: fields["store"].get(key) for key in ("rows", "ids", "content")})
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise StoreError(f"{target}: unreadable FAISS index record ({type(err).__name__}: {err}).") from err
    return fields, size


def _check_store(target: Path, recorded: dict[str, Any], store: PreconditionedStore) -> None:
    """Refuses a preconditioned store other than the one the index was built from, naming what differs.

    Raises:
        StoreError: another curvature, or other rows, ids or gradients.
    """
    if recorded["curvature"] != store.record.curvature:
        raise StoreError(
            f"{target}: the index was built from a store preconditioned with another curvature ({recorded['method']} "
            f"{recorded['curvature']}) than {store.path}'s ({store.record.method} {store.record.curvature}). Load it "
            f"with the store it was built from, or build an index of this store (FaissIndex.build)."
        )
    built = StoreIdentity(recorded["rows"], recorded["ids"], recorded["content"])
    differences = built.differences(store.identity())
    if differences:
        raise StoreError(
            f"{target}: the index was built from another store than {store.path} ({'; '.join(differences)}, "
            f"built → given): the store was written again or is another one. Build an index of this store "
            f"(FaissIndex.build) and save it."
        )


def _check_digest(target: Path, handle: Any, size: int, sha256: str) -> None:
    """Refuses an index whose first ``size`` bytes do not have the recorded SHA-256 (read in 1 MiB chunks).

    Raises:
        StoreError: the bytes differ from those saved.
    """
    digest = hashlib.sha256()
    handle.seek(0)
    for data in iter(_reader(handle, size), b""):
        digest.update(data)
    if digest.hexdigest() != sha256:
        raise StoreError(
            f"{target}: the FAISS index does not match its recorded SHA-256: the file is damaged. Build the index "
            f"again (FaissIndex.build) and save it."
        )
    handle.seek(0)


def _reader(handle: Any, size: int) -> Any:
    """A function ``read(n)`` of the next at most ``n`` bytes (1 MiB when not given) of the first ``size``."""
    left = size

    def read(n: int = _CHUNK) -> bytes:
        nonlocal left
        data = handle.read(min(n, left))
        left -= len(data)
        return bytes(data)

    return read
