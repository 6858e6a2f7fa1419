"""Sub-linear top-k: a FAISS inner-product index over a preconditioned store (optional: ``hookinf[faiss]``).

The total influence of training example ``j`` on query ``q`` is ``−Σ_l g_l(z_q)ᵀ p_l(z_j)`` with
``p_l = (G_l + λ_l I)⁻¹ g_l`` the preconditioned gradients of a :class:`~hookinf.PreconditionedStore`: one inner
product of the layers' vectors concatenated, ``−⟨g(z_q), p(z_j)⟩``. :class:`FaissIndex` holds the ``p(z_j)`` (float32)
in a FAISS index; the most harmful examples are the largest inner products with ``−g(z_q)``, the most helpful the
largest with ``g(z_q)`` (maximum inner product search). ``kind="ivf"`` (an inverted file of ``nlist`` k-means cells,
``nprobe`` of them searched per query) is approximate and sub-linear; ``kind="flat"`` is exact and linear (a
reference). ``benchmarks/retrieval.py`` measures the recall@k of ``ivf`` against exact streaming top-k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hookinf.compress import from_config
from hookinf.errors import ConfigurationError, DataError
from hookinf.ids import Ids, sort_order, take
from hookinf.preconditioned import PreconditionedStore
from hookinf.runner import LossFn, Runner, check_reiterable
from hookinf.scores import TopK
from hookinf.selection import ModuleSpec
from hookinf.shapes import fingerprint
from hookinf.weights import weights_hash

IndexKind = Literal["ivf", "flat"]


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:
        raise ConfigurationError("the FAISS index needs faiss: pip install 'hookinf[faiss]'.") from err
    return faiss


class FaissIndex:
    """An inner-product FAISS index over a preconditioned store's gradients, all layers concatenated.

    Build one with :meth:`build`; rank queries with :meth:`top_k` (from data) or :meth:`search` (from vectors).

    Attributes:
        store: the preconditioned store it indexes.
        index: the FAISS index (rows in the store's storage order).
        kind: ``"ivf"`` or ``"flat"``.
    """

    def __init__(self, store: PreconditionedStore, index: Any, kind: IndexKind) -> None:
        self.store = store
        self.index = index
        self.kind = kind
        ids = store.ids
        order = sort_order(ids)
        self._sorted: Ids = take(ids, order)
        self._column = torch.empty(len(store), dtype=torch.int64)
        self._column[order] = torch.arange(len(store))  # storage row → column (rank of its id)

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
            rows = torch.randperm(len(store), generator=generator)[:train_size].sort().values.numpy()
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

    def _ids_at(self, columns: Tensor) -> Tensor | list[list[str]]:
        if isinstance(self._sorted, Tensor):
            return self._sorted[columns]
        return [[self._sorted[j] for j in row] for row in columns.tolist()]

    def __repr__(self) -> str:
        return f"FaissIndex({self.kind}, {self.index.ntotal:,} rows × {self.index.d}, {self.store.path})"
