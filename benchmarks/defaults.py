"""Defaults chosen by measurement: LDS against damping × Fisher × checkpoints, per method, on three models.

    .venv/bin/python benchmarks/defaults.py [--quick] [--subsets 32]

Three cases, each trained once with :class:`hookinf.Snapshots` keeping four checkpoints (after each quarter of
training), and retrained from scratch (same init, schedule and data-order seed) on random halves of its training set
(``hookinf.retrain.retrain_subsets``) for the LDS (``hookinf.metrics.lds``):

A. the digits MLP 64-32-10 of ``benchmarks/checkpoints.py`` (case A's model, data and Adam schedule, 40 epochs
   instead of 100): 1,200 training digits of which 10% have flipped labels, 100 held-out queries.
B. the digits CNN of ``benchmarks/checkpoints.py`` (case B as it is: conv 8, conv 16, linear; SGD with momentum and
   a cosine learning rate, 40 epochs), same data.
C. a tiny GPT-2 language model (``transformers.GPT2LMHeadModel``, 2 blocks, width 24, 4 heads, random init) trained
   with AdamW on the ``tiny_gpt2_lm`` example's generated instruction sequences (8 families × 45 = 360 training
   sequences, 8 held-out queries per family); the loss is the summed NLL of each sequence's response, and hookinf
   tracks the blocks' ``Conv1D`` layers (``modules=["transformer.h.*"]``; ``lm_head`` is tied to the embedding).

For every case the grid is: relative damping ∈ {0.001, 0.01, 0.1, 1, 10, 100} for ``exact``, ``kfac``, ``ekfac`` and
``datainf``; Fisher ∈ {empirical, sampled} for the fitted curvatures (``exact``, ``kfac``, ``ekfac``; ``exact`` on
the empirical Fisher only in cases B and C, where its factorisations dominate the run; ``datainf`` streams over the
given labels); and the scores of the final checkpoint alone or of the four checkpoints combined
with ``combine="normalized"`` (both from one ``hookinf.influence(..., checkpoints=...)`` call: the final checkpoint
is the trained model). ``identity`` has no damping: its two rows are a reference. ``lissa`` is left out (its
damping enters the same way, and it needs hundreds of passes per setting).

The rule that picks a default per method: in each row (case × Fisher × checkpoints) the best damping is the one with
the highest mean LDS, and a damping *holds* in that row when its mean LDS is within one standard error (over
queries) of the best's. A damping that holds in every row of the method is a candidate; the
current default 0.1 stays if it is one, otherwise the candidate with the highest mean LDS over the rows wins; with
no candidate, the damping whose worst shortfall from a row's best is smallest. The tables also count the rows where
a damping is worse than the best by more than one s.e. of the paired per-query difference (a difference the queries
agree on, however small). ``--raw PATH`` saves every per-query LDS (``torch.save``) and ``--tables-from PATH`` prints
the tables again from such a file. A full run writes ``benchmarks/results/defaults.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _report import Report, Section
from checkpoints import CASES, N_QUERY, SEED, batches, train
from rich.console import Console
from torch import Tensor, nn

import hookinf
from hookinf.demo import flipped_digits
from hookinf.losses import Fisher
from hookinf.metrics import lds
from hookinf.retrain import retrain_subsets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "defaults.md"
DAMPINGS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
CURRENT = 0.1  # hookinf's default relative damping before this measurement
FISHERS: tuple[Fisher, ...] = ("empirical", "sampled")
FITTED = ("exact", "kfac", "ekfac")
SCORES = ("final", "4 ckpts")  # the final checkpoint alone; four checkpoints combined "normalized"
DIGITS_LOSS = hookinf.CrossEntropy(logits=lambda model, batch: model(batch[0]), target=lambda batch: batch[1])


@dataclass
class Trained:
    """One case, trained: what the sweep scores and what the LDS retrains.

    Attributes:
        name: the case's title.
        model: the trained model (its weights are the last checkpoint's).
        checkpoints: four snapshots, in step order.
        train: in-order training batches.
        query: query batches.
        loss: ``loss(model, batch)`` → per-example losses ``[B]``.
        modules: the layers hookinf tracks (``None``: its default selection).
        retrain: ``retrain(mask)`` → the query losses ``[n_query]`` of a model trained from scratch on ``mask``.
        n_train: training examples.
        n_query: queries.
        note: how it was trained and how well it does.
        exact_fishers: the Fishers ``exact`` is swept over (its factorisations are the sweep's largest cost).
    """

    name: str
    model: nn.Module
    checkpoints: list[Any]
    train: list[Any]
    query: list[Any]
    loss: Any
    modules: list[str] | None
    retrain: Callable[[Tensor], Tensor]
    n_train: int
    n_query: int
    note: str
    exact_fishers: tuple[Fisher, ...] = FISHERS


# ---------------------------------------------------------------------------------------------------- cases
def digits_case(index: int, epochs: int, n_query: int) -> Trained:
    """Case A (the MLP, ``index=0``) or B (the CNN, ``index=1``) of ``benchmarks/checkpoints.py``."""
    case = replace(CASES[index], epochs=epochs)
    x, y, _, x_test, y_test, _ = flipped_digits(SEED)
    x = x.float().reshape(-1, *case.shape)
    xq, yq = x_test[:n_query].float().reshape(-1, *case.shape), y_test[:n_query]
    start = time.perf_counter()
    model, snaps, _ = train(case, x, y)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(x_test.float().reshape(-1, *case.shape)).argmax(1) == y_test).float().mean())

    def retrain(mask: Tensor) -> Tensor:
        retrained, _, _ = train(case, x[mask], y[mask])
        with torch.no_grad():
            return F.cross_entropy(retrained(xq), yq, reduction="none")

    cnn = "B. digits CNN (conv 8, conv 16, linear), SGD + cosine lr"
    title = "A. digits MLP 64-32-10, Adam" if index == 0 else cnn
    return Trained(
        name=f"{title}, {epochs} epochs",
        model=model,
        checkpoints=snaps.checkpoints,
        train=batches(x, y),
        query=batches(xq, yq),
        loss=DIGITS_LOSS,
        modules=None,
        retrain=retrain,
        n_train=len(x),
        n_query=len(xq),
        note=f"trained in {seconds:.1f} s, test accuracy {accuracy:.1%}; checkpoints after epochs {snaps.steps}",
        # the CNN's 5,770-parameter head makes each exact factorisation ~64 GFLOP: the empirical Fisher only
        exact_fishers=FISHERS if index == 0 else ("empirical",),
    )


def _example(name: str) -> Any:
    """Imports ``examples/<name>.py`` (its corpus, tokenizer and loss are reused)."""
    spec = importlib.util.spec_from_file_location(f"hookinf_example_{name}", ROOT / "examples" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"examples/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered while it executes (its dataclasses resolve it by name)
    spec.loader.exec_module(module)
    return module


LM_WIDTH, LM_LR, LM_BATCH = 24, 1e-2, 32


def lm_case(per_family: int, queries_per_family: int, epochs: int) -> Trained:
    """Case C: a 2-block, width-24 GPT-2 trained from scratch on the ``tiny_gpt2_lm`` example's sequences."""
    ex = _example("tiny_gpt2_lm")  # sets HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE before transformers loads
    from transformers import GPT2Config, GPT2LMHeadModel

    corpus = ex.make_corpus(per_family + queries_per_family, random.Random(SEED))
    n_train = per_family * len(ex.FAMILIES)
    examples, queries = corpus[:n_train], corpus[n_train:]
    tok = ex.WordTokenizer(corpus)
    length = max(len(e.words) for e in corpus)
    ids, labels = tok.encode(examples, length)
    query_ids, query_labels = tok.encode(queries, length)
    config = GPT2Config(
        vocab_size=len(tok.vocab),
        n_positions=length,
        n_embd=LM_WIDTH,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",  # type: ignore[call-arg]  # a PretrainedConfig keyword GPT2Config does not declare
    )

    def fit_lm(ids: Tensor, labels: Tensor) -> tuple[nn.Module, hookinf.Snapshots]:
        torch.manual_seed(SEED)
        model = GPT2LMHeadModel(config)
        snaps = hookinf.Snapshots(model, every=max(epochs // 4, 1))
        gen = torch.Generator().manual_seed(SEED)
        opt = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.01, foreach=True)
        steps = epochs * -(-len(ids) // LM_BATCH)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LM_LR, total_steps=steps, pct_start=0.1)
        model.train()
        for epoch in range(1, epochs + 1):
            for idx in torch.randperm(len(ids), generator=gen).split(LM_BATCH):
                opt.zero_grad()
                ex.LOSS(model, (ids[idx], labels[idx])).mean().backward()
                opt.step()
                sched.step()
            snaps.take(epoch)
        return model.eval(), snaps

    start = time.perf_counter()
    model, snaps = fit_lm(ids, labels)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        query_loss = float(ex.LOSS(model, (query_ids, query_labels)).mean())
    exact_match = sum(ex.complete(model, tok, q, length) == q.response for q in queries) / len(queries)

    def retrain(mask: Tensor) -> Tensor:
        retrained, _ = fit_lm(ids[mask], labels[mask])
        with torch.no_grad():
            return ex.LOSS(retrained, (query_ids, query_labels)).double()

    return Trained(
        name=(
            f"C. tiny GPT-2 LM (2 blocks, width {LM_WIDTH}), AdamW + one-cycle lr, {epochs} epochs, "
            f"{len(ex.FAMILIES)} families"
        ),
        model=model,
        checkpoints=snaps.checkpoints,
        train=ex.batches(ids, labels),
        query=ex.batches(query_ids, query_labels),
        loss=ex.LOSS,
        modules=["transformer.h.*"],
        retrain=retrain,
        n_train=n_train,
        n_query=len(queries),
        exact_fishers=("empirical",),  # eight blocks of up to 2,400 parameters, factorised per damping and checkpoint
        note=(
            f"{sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tok.vocab)}, sequences of "
            f"{length} tokens; trained in {seconds:.1f} s; held-out queries: mean response NLL {query_loss:.2f} "
            f"(summed over tokens), greedy completions {exact_match:.0%} exactly right; checkpoints after epochs "
            f"{snaps.steps}"
        ),
    )


# ---------------------------------------------------------------------------------------------------- sweep
Row = tuple[str, str, str]  # (method, Fisher, scores)
Grid = dict[Row, dict[float | None, Tensor | None]]  # row → damping → per-query LDS [n_query] (None: failed)


def sweep(t: Trained, masks: Tensor, losses: Tensor, console: Console) -> tuple[Grid, dict[str, float]]:
    """Per-query LDS of every (method, Fisher, scores, damping); seconds per method."""
    grid: Grid = {}
    seconds: dict[str, float] = {}
    common: dict[str, Any] = {"modules": t.modules, "progress": False}

    def record(method: str, fisher: str, damping: float | None, scores: hookinf.CheckpointScores | None) -> None:
        for label in SCORES:
            cell = grid.setdefault((method, fisher, label), {})
            if scores is None:
                cell[damping] = None
                continue
            total = scores.per_checkpoint[-1].total if label == "final" else scores.total
            cell[damping] = lds(total, masks, losses).per_query

    def influence(method: Any, damping: float | None, fisher: str = "empirical") -> hookinf.CheckpointScores | None:
        try:
            scores = hookinf.influence(
                t.model,
                t.train,
                t.query,
                t.loss,
                method=method,
                damping=damping,
                fisher=fisher,  # type: ignore[arg-type]
                checkpoints=t.checkpoints,
                **common,
            )
        except hookinf.HookinfError as err:  # e.g. a block not positive definite at a tiny damping
            console.print(f"  {method if isinstance(method, str) else 'fitted'} damping {damping:g}: {err}")
            return None
        assert isinstance(scores, hookinf.CheckpointScores)
        return scores

    for method in FITTED:
        start = time.perf_counter()
        for fisher in FISHERS if method != "exact" else t.exact_fishers:
            try:
                curvatures = hookinf.fit(
                    t.model,
                    t.train,
                    t.loss,
                    method=method,
                    fisher=fisher,
                    checkpoints=t.checkpoints,
                    **common,
                )
            except hookinf.HookinfError as err:  # e.g. an eigendecomposition that does not converge
                console.print(f"  {method} {fisher}: the fit fails: {err}")
                for damping in DAMPINGS:
                    record(method, fisher, damping, None)
                continue
            for damping in DAMPINGS:
                record(method, fisher, damping, influence(curvatures, damping))
        seconds[method] = time.perf_counter() - start
        console.print(f"  {method}: {seconds[method]:.1f} s")
    start = time.perf_counter()
    for damping in DAMPINGS:
        record("datainf", "empirical", damping, influence("datainf", damping))
    seconds["datainf"] = time.perf_counter() - start
    start = time.perf_counter()
    record("identity", "—", None, influence("identity", None))
    seconds["identity"] = time.perf_counter() - start
    console.print(f"  datainf: {seconds['datainf']:.1f} s, identity: {seconds['identity']:.1f} s")
    return grid, seconds


# ---------------------------------------------------------------------------------------------------- statistics
def kept(values: Tensor) -> Tensor:
    return values[~values.isnan()]


def mean(values: Tensor) -> float:
    return float(kept(values).mean())


def se(values: Tensor) -> float:
    values = kept(values)
    return float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else math.nan


@dataclass(frozen=True)
class Standing:
    """One damping in one row, against the row's best.

    Attributes:
        best: the row's best damping.
        gap: this damping's mean LDS − the best's (≤ 0; −inf when it failed).
        best_se: the s.e. over queries of the best's LDS (the margin of the rule).
        paired_se: the s.e. over queries of the per-query difference to the best.
    """

    best: float | None
    gap: float
    best_se: float
    paired_se: float

    @property
    def holds(self) -> bool:
        """Within one s.e. (of the best's LDS) of the row's best: the rule's test."""
        return self.gap >= -self.best_se

    @property
    def significant(self) -> bool:
        """Worse than the row's best by more than one paired s.e. (a difference the queries agree on)."""
        return self.gap < -self.paired_se


def standings(cells: dict[float | None, Tensor | None]) -> dict[float | None, Standing]:
    ok = {d: v for d, v in cells.items() if v is not None}
    best = max(ok, key=lambda d: mean(ok[d]))
    out = {}
    for damping, values in cells.items():
        if values is None:
            out[damping] = Standing(best, -math.inf, se(ok[best]), 0.0)
        else:
            out[damping] = Standing(best, mean(values) - mean(ok[best]), se(ok[best]), se(values - ok[best]))
    return out


def choose(rows: Sequence[dict[float | None, Tensor | None]]) -> tuple[float, str]:
    """The rule of the module docstring: the default damping over these rows, and why."""
    table = [standings(cells) for cells in rows]
    holds = [d for d in DAMPINGS if all(s[d].holds for s in table)]
    if CURRENT in holds:
        return CURRENT, f"{CURRENT:g} holds in all {len(rows)} rows (kept)"
    if holds:
        best = max(holds, key=lambda d: sum((mean(v) for c in rows if (v := c[d]) is not None), 0.0))
        return best, f"holds in all {len(rows)} rows; {CURRENT:g} does not"
    worst = {d: min(s[d].gap for s in table) for d in DAMPINGS}
    best = max(DAMPINGS, key=lambda d: worst[d])
    return best, f"no damping holds in all {len(rows)} rows; smallest worst shortfall ({worst[best]:+.3f})"


# ---------------------------------------------------------------------------------------------------- report
def cell_text(values: Tensor | None, standing: Standing | None, method_best: bool) -> str:
    if values is None:
        return "fails"
    text = f"{mean(values):.3f} ± {se(values):.3f}"
    if standing is not None and standing.gap == 0:
        text = f"**{text}**"
    elif standing is not None and standing.holds:
        text += " ≈"
    return text + (" ★" if method_best else "")


@dataclass
class CaseResult:
    """What a case's run leaves for the tables (and what ``--raw`` saves).

    Attributes:
        name: the case's title.
        n_query: queries.
        n_subsets: retrained halves.
        note: how it was trained and how well it does.
        grid: per-query LDS per row and damping.
        seconds: seconds of the sweep per method.
        retrain_seconds: seconds of training and retraining.
    """

    name: str
    n_query: int
    n_subsets: int
    note: str
    grid: Grid
    seconds: dict[str, float]
    retrain_seconds: float


def case_section(r: CaseResult) -> Section:
    t, grid, seconds = r, r.grid, r.seconds
    section = Section(
        f"{t.name}: LDS (mean ± s.e. over {t.n_query} queries) over {r.n_subsets} retrained halves",
        ["method", "Fisher", "scores", *[f"damping {d:g}" for d in DAMPINGS]],
    )
    for method in (*FITTED, "datainf", "identity"):
        rows = {row: cells for row, cells in grid.items() if row[0] == method}
        ok = [(row, d, v) for row, cells in rows.items() for d, v in cells.items() if v is not None]
        top = max(ok, key=lambda item: mean(item[2]))
        for row, cells in rows.items():
            if method == "identity":
                values = cells[None]
                text = "—" if values is None else f"{mean(values):.3f} ± {se(values):.3f} (no damping)"
                texts = ["—"] * len(DAMPINGS)
                texts[DAMPINGS.index(CURRENT)] = text
                section.rows.append([*row, *texts])
                continue
            stand = standings(cells)
            section.rows.append([*row, *(cell_text(cells[d], stand[d], (row, d) == top[:2]) for d in DAMPINGS)])
    section.notes += [
        t.note,
        "Bold: the row's best damping; ≈: within one s.e. of it (the s.e. over queries of the best's LDS, the "
        "rule's margin); ★: the method's best in this case. 'final': the final checkpoint alone (what "
        "hookinf.influence gives without checkpoints=); '4 ckpts': the four checkpoints, combine='normalized'.",
        "Seconds of the sweep (every fit and scoring of the grid, 4 checkpoints each): "
        + ", ".join(f"{m} {s:.0f}" for m, s in seconds.items())
        + ". identity has no damping: its value is a reference, shown once per row.",
        f"Training and the {r.n_subsets} retrainings took {r.retrain_seconds:.0f} s.",
    ]
    if ("exact", "sampled", "final") not in grid:
        section.notes.append("exact: the empirical Fisher only here (its factorisations dominate the run).")
    return section


def defaults_section(grids: Sequence[Grid]) -> tuple[Section, dict[str, tuple[float, str]]]:
    section = Section(
        "Per-method defaults by the rule (rows: case × Fisher × scores; 'holds': within one s.e. of the row's best)",
        ["method", "rows", *[f"{d:g}: holds · worse · worst gap" for d in DAMPINGS], "chosen"],
    )
    chosen: dict[str, tuple[float, str]] = {}
    for method in (*FITTED, "datainf"):
        rows = [cells for grid in grids for row, cells in grid.items() if row[0] == method]
        table = [standings(cells) for cells in rows]
        value, why = choose(rows)
        chosen[method] = (value, why)
        section.rows.append(
            [
                method,
                str(len(rows)),
                *(
                    f"{sum(s[d].holds for s in table)} · {sum(s[d].significant for s in table)} · "
                    f"{min(s[d].gap for s in table):+.3f}"
                    for d in DAMPINGS
                ),
                f"{value:g} ({why})",
            ]
        )
    section.notes.append(
        "Per damping: the rows where it holds; the rows where it is worse than the row's best by more than one "
        "paired s.e. (the s.e. over queries of the per-query difference: a difference the queries agree on, however "
        "small); the largest shortfall of its mean LDS from a row's best (−inf where a setting failed). identity "
        "takes no damping."
    )
    return section, chosen


def summary_section(
    cases: Sequence[CaseResult], grids: Sequence[Grid], chosen: dict[str, tuple[float, str]]
) -> Section:
    """The compact table of the docs: per method and case, the best damping and the LDS at 0.1 and at the default."""
    section = Section(
        "Summary (empirical Fisher, final checkpoint: hookinf's defaults): best damping (its LDS) · LDS at "
        f"{CURRENT:g} · LDS at the chosen default",
        ["method", *[t.name.split(" (")[0].split(",")[0] for t in cases], "chosen default"],
    )
    for method in (*FITTED, "datainf", "identity"):
        row = [method]
        for grid in grids:
            if method == "identity":
                values = grid[("identity", "—", "final")][None]
                row.append("—" if values is None else f"{mean(values):.3f} (no damping)")
                continue
            cells = grid[(method, "empirical", "final")]
            stand = standings(cells)
            best = stand[DAMPINGS[0]].best
            assert best is not None
            at = {d: "fails" if cells[d] is None else f"{mean(cells[d]):.3f}" for d in DAMPINGS}  # type: ignore[arg-type]
            row.append(f"{best:g} ({at[best]}) · {at[CURRENT]} · {at[chosen[method][0]]}")
        row.append("no damping" if method == "identity" else f"{chosen[method][0]:g}")
        section.rows.append(row)
    return section


# ---------------------------------------------------------------------------------------------------- main
def tables(report: Report, results: Sequence[CaseResult]) -> None:
    for result in results:
        report.add(case_section(result))
    grids = [r.grid for r in results]
    section, chosen = defaults_section(grids)
    report.add(section)
    report.add(summary_section(results, grids, chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and 5 retrained subsets: a smoke run")
    parser.add_argument("--subsets", type=int, default=32, help="retrained random halves per case (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cases", default="ABC", help="which cases to run (default ABC)")
    parser.add_argument("--raw", type=Path, default=None, help="also save every per-query LDS here (torch.save)")
    parser.add_argument("--tables-from", type=Path, default=None, help="print the tables of a --raw file; no run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_subsets = 5 if args.quick else args.subsets
    console = Console(width=max(150, Console().width))
    report = Report(console, "Defaults chosen by measurement: LDS against damping × Fisher × checkpoints")
    if args.tables_from is not None:
        raw = torch.load(args.tables_from, weights_only=False)
        for line in raw["header"]:
            report.line(line)
        tables(report, [CaseResult(**case) for case in raw["cases"]])
        report.line(raw["footer"])
        if raw["full"]:
            RESULTS.write_text(report.markdown(), encoding="utf-8")
            console.print(f"wrote {os.path.relpath(RESULTS)}")
        return
    report.run_header(__file__, sys.argv[1:], args.threads)
    start = time.perf_counter()
    makers: dict[str, Callable[[], Trained]] = {
        "A": lambda: digits_case(0, 8 if args.quick else 40, 20 if args.quick else N_QUERY),
        "B": lambda: digits_case(1, 8 if args.quick else 40, 20 if args.quick else N_QUERY),
        "C": lambda: lm_case(12 if args.quick else 45, 2 if args.quick else 8, 8 if args.quick else 32),
    }
    results: list[CaseResult] = []
    for key in args.cases:
        tick = time.perf_counter()
        t = makers[key]()
        console.print(f"[{t.name}] {t.note}; retraining {n_subsets} random halves")
        masks, losses = retrain_subsets(t.retrain, t.n_train, n_subsets=n_subsets, fraction=0.5, seed=SEED)
        retrain_seconds = time.perf_counter() - tick
        console.print(f"[{t.name}] sweeping")
        grid, seconds = sweep(t, masks, losses, console)
        results.append(CaseResult(t.name, t.n_query, n_subsets, t.note, grid, seconds, retrain_seconds))
        console.print(case_section(results[-1]).rich())
    report.console = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - the tables were printed case by case
    tables(report, results)
    report.console = console
    console.print(report.sections[-2].rich(), report.sections[-1].rich())
    footer = f"total {time.perf_counter() - start:.0f} s · load average at end {os.getloadavg()[0]:.2f}"
    report.line(footer)
    full = not args.quick and args.cases == "ABC"
    if args.raw is not None:
        cases = [vars(r) for r in results]
        torch.save({"header": report.header[:2], "cases": cases, "footer": footer, "full": full}, args.raw)
    if full:
        RESULTS.write_text(report.markdown(), encoding="utf-8")
        console.print(f"wrote {os.path.relpath(RESULTS)}")


if __name__ == "__main__":
    main()
