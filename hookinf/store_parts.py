"""A gradient store written by several ranks: one part per rank, and the merge that lists them in one manifest.

Layout (``path`` is the store)::

    path/manifest.json          the merged manifest (absent until a merge or a single-process write)
    path/shard-NNNNNN.safetensors   shards written by one process (or rewritten by a merge, see below)
    path/rank-00000/            rank 0's part: a gradient store of its own (manifest, shards, writer.lock)
    path/rank-00001/            rank 1's part ...

Each rank writes only its own part, under that part's own writer lock, with the store's usual durability (a shard is
durable before its part's manifest lists it). The store opens as the *view* :func:`load_view` builds: the shards the
top manifest lists, then, part by part in rank order, every shard of a part that the top manifest has not merged yet
(listed as ``rank-NNNNN/shard-NNNNNN.safetensors``). So a store whose merge never ran — a rank died, the job was
killed — opens, resumes and scores from its parts as they are. The view records the weights the parts with unmerged
shards record (they were logged after the top manifest was last merged): these must agree with each other, and with
the top's unless they come from the run that wrote it (a watch whose loop trains between two entries).

:func:`merge_parts` (rank 0, after every rank closed its part) writes that view as the top manifest in one atomic
rename, recording the merged part shards under ``merged`` so they are never counted twice. It keeps every id once:
an id that an earlier shard holds already (``DistributedSampler`` pads the last ranks' shards by repeating the first
examples) is left out — a part shard that holds only repeats is not listed, and one that holds some is rewritten
without them as a new top-level shard (written and fsynced before the manifest names it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from hookinf.errors import StoreError
from hookinf.ids import id_values, strings_to_tensor, take
from hookinf.io import remove_temporaries, write_json, write_safetensors
from hookinf.lock import WriterLock
from hookinf.store_format import (
    INT_IDS,
    MANIFEST,
    STR_IDS,
    Shard,
    StoreManifest,
    check_shard,
    next_shard_name,
    read_ids,
    read_tensors,
    unlisted_shards,
)
from hookinf.weights import WeightsRecord

_PART = re.compile(r"rank-\d{5}")
_IN_PART = re.compile(r"rank-\d{5}/")


def part_path(path: str | os.PathLike[str], rank: int) -> Path:
    """The directory of rank ``rank``'s part of the store at ``path``."""
    return Path(path) / f"rank-{rank:05d}"


def parts(directory: Path) -> list[str]:
    """The names of the store's parts that hold a manifest, in rank order."""
    if not directory.is_dir():
        return []
    names = (entry.name for entry in os.scandir(directory) if entry.is_dir() and _PART.fullmatch(entry.name))
    return sorted(name for name in names if (directory / name / MANIFEST).is_file())


def read_manifest(directory: Path) -> StoreManifest:
    """The manifest of the store (or part) in ``directory``, parsed and checked.

    Raises:
        StoreError: it is corrupt (names the file).
    """
    path = directory / MANIFEST
    try:
        return StoreManifest.parse(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise StoreError(
            f"{path}: corrupt gradient store manifest ({type(err).__name__}: {err}); the store in {directory} cannot "
            f"be read."
        ) from err


def load_view(directory: Path) -> StoreManifest:
    """The store as it opens: the top manifest's shards, then the parts' shards it has not merged (module docstring).

    Every listed shard's size and header are checked.

    Raises:
        StoreError: no store here, a damaged manifest or shard, or parts that disagree with the store (another
            configuration, kind of ids, or weights).
    """
    names = parts(directory)
    if (directory / MANIFEST).is_file():
        top = read_manifest(directory)
    elif names:
        top = replace(read_manifest(directory / names[0]), shards=(), ids=None, merged=())
    else:
        raise StoreError(f"{directory}: no hookinf gradient store here (missing {MANIFEST}).")
    for shard in top.shards:
        check_shard(directory, top, shard)
    done = {shard.file for shard in top.shards} | set(top.merged)
    extra: list[Shard] = []
    kind = top.ids
    records: list[WeightsRecord] = []  # the records of the parts with unmerged shards: newer than the top's
    fallback = top.weights
    for name in names:
        part = read_manifest(directory / name)
        _check_same(directory, top, part, name)
        fresh = [shard for shard in part.shards if f"{name}/{shard.file}" not in done]
        for shard in fresh:
            check_shard(directory / name, part, shard)
            extra.append(replace(shard, file=f"{name}/{shard.file}"))
        if fresh and kind not in (None, part.ids):
            raise StoreError(f"{directory / name}: the part holds {part.ids} ids and the store {kind} ids.")
        kind = kind if not fresh else part.ids
        fallback = fallback or part.weights
        if fresh and part.weights is not None:
            records.append(part.weights)
    hashes = {record.hash for record in records}
    if top.weights is not None and top.shards and not any(record.run == top.weights.run for record in records):
        hashes.add(top.weights.hash)  # the same run may have moved its weights since the top was merged
    if len(hashes) > 1:
        raise StoreError(
            f"{directory}: its parts hold gradients taken at different weights ({sorted(hashes)}); the ranks must log "
            f"the same model. Log again with overwrite=True."
        )
    weights = records[0] if records else fallback
    return replace(top, shards=(*top.shards, *extra), ids=kind, weights=weights)


def _check_same(directory: Path, top: StoreManifest, part: StoreManifest, name: str) -> None:
    mine = (top.compressor, top.layers, top.original, top.dtype, top.fingerprint)
    if (part.compressor, part.layers, part.original, part.dtype, part.fingerprint) != mine:
        raise StoreError(
            f"{directory / name}: the part was logged with another compressor or model than the store in {directory}; "
            f"every rank must log the same model with the same compressor (and seed)."
        )


def merge_parts(directory: Path, weights: WeightsRecord | None = None) -> StoreManifest:
    """Lists every part's shards in the top manifest (one atomic rename), keeping every id once; under the lock.

    Run it on one rank once every rank has closed its part (:func:`hookinf.log` and a watch's exit do, on rank 0).

    Args:
        directory: the store.
        weights: the weights the merged store records (those the merging rank's logging ended at, which a watch
            that trained records even when it logged no new shard); ``None``: the view's (:func:`load_view`).

    Returns:
        The merged manifest.

    Raises:
        StoreError: another writer holds the store, a part is damaged or disagrees, or a write failed.
    """
    lock = WriterLock.acquire(directory)
    try:
        remove_temporaries(directory, (MANIFEST, "shard-"))
        view = load_view(directory)
        seen: set[int | str] = set()
        shards: list[Shard] = []
        merged = list(view.merged)
        for shard in view.shards:
            values = id_values(read_ids(directory, view, shard))
            keep = [value not in seen for value in values]
            seen.update(values)
            if _IN_PART.match(shard.file):
                merged.append(shard.file)
            if all(keep):
                shards.append(shard)
            elif any(keep):
                shards.append(_without_repeats(directory, view, shards, shard, keep))
        merged_parts = tuple(dict.fromkeys(merged))
        manifest = replace(view, shards=tuple(shards), merged=merged_parts, weights=weights or view.weights)
        try:
            write_json(directory / MANIFEST, manifest.to_json())
        except OSError as err:
            raise StoreError(f"{directory}: cannot write the merged {MANIFEST} ({err.strerror or err}).") from err
        return manifest
    finally:
        lock.release()


def _without_repeats(
    directory: Path, view: StoreManifest, written: list[Shard], shard: Shard, keep: list[bool]
) -> Shard:
    """A new top-level shard holding ``shard``'s examples whose ``keep`` is true (written durably)."""
    index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.int64, device="cpu")
    tensors = {name: t[index].contiguous() for name, t in read_tensors(directory, shard, list(view.layers)).items()}
    ids = take(read_ids(directory, view, shard), index)
    if isinstance(ids, torch.Tensor):
        tensors[INT_IDS] = ids.contiguous()
    else:
        tensors[STR_IDS] = strings_to_tensor(ids)
    file = next_shard_name(directory, written)
    try:
        digest = write_safetensors(directory / file, tensors)
    except OSError as err:
        raise StoreError(f"{directory}: cannot write shard {file} ({err.strerror or err}) while merging.") from err
    return Shard(file, len(index), digest.size, digest.sha256)


def clear_store(directory: Path) -> None:
    """Removes the store at ``directory`` — its manifest, shards and parts — under its writer lock (``overwrite``)."""
    if not directory.is_dir():
        return
    lock = WriterLock.acquire(directory)
    try:
        (directory / MANIFEST).unlink(missing_ok=True)
        for name in unlisted_shards(directory, ()):
            (directory / name).unlink()
        remove_parts(directory)
    except OSError as err:
        raise StoreError(f"{directory}: cannot remove the store ({err.strerror or err}).") from err
    finally:
        lock.release()


def remove_parts(directory: Path) -> None:
    """Removes every part directory (``rank-NNNNN/``) of the store.

    Raises:
        OSError: a removal failed.
    """
    for name in os.listdir(directory):
        if _PART.fullmatch(name) and (directory / name).is_dir():
            shutil.rmtree(directory / name)
