"""The ``hookinf`` console script (also ``python -m hookinf``).

Commands: ``demo`` (the embedded default), ``report SCORES_DIR [--html OUT] [--queries N] [--query ROWS |
--misclassified]`` (a terminal or self-contained HTML report of saved scores, with the text and thumbnails they
carry: see :meth:`hookinf.Scores.with_descriptions`), ``info PATH [--verify]`` (what a saved curvature, gradient
store or scores directory holds; ``--verify`` also reads every file of a store and checks its checksum). A missing
or corrupt file is one line on stderr naming the path and what is wrong, and exit status 1 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from hookinf.errors import ConfigurationError, HookinfError
from hookinf.report.content import DEFAULT_QUERIES, misclassified_queries, select_queries
from hookinf.report.terminal import scores_report
from hookinf.scores import load_scores


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hookinf",
        description="Per-layer influence functions for PyTorch: which training examples, and which layers, "
        "made my model do this?",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="find flipped labels in scikit-learn's digits with exact and identity influence (no download)",
        description="Train an MLP on scikit-learn's bundled digits with 10% flipped labels and report the "
        "suspects, the detection AUC per method and each layer's share of influence.",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, flips and training (default 0)")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    report = commands.add_parser(
        "report",
        help="print (or write as HTML) a report of scores saved with Scores.save",
        description="Per-layer shares, how concentrated influence is, and the most harmful and helpful training "
        "examples of the queries with the largest total |influence| (or the queries chosen with --query or "
        "--misclassified), each shown with the text and thumbnail the scores were saved with. With --html, writes "
        "the report with its plots as one self-contained HTML file instead (needs matplotlib: pip install "
        "'hookinf[report]').",
    )
    report.add_argument("scores", metavar="SCORES_DIR", help="a directory written by Scores.save")
    report.add_argument(
        "--queries",
        type=int,
        default=None,
        metavar="N",
        help="detail the N queries with the largest total |influence| (default 3); with --misclassified, the N "
        "misclassified ones with the largest",
    )
    chosen = report.add_mutually_exclusive_group()
    chosen.add_argument(
        "--query",
        action="append",
        metavar="ROWS",
        help="detail these queries, by row of the scores, in this order: e.g. --query 3,17 (repeatable)",
    )
    chosen.add_argument(
        "--misclassified",
        action="store_true",
        help="detail the misclassified queries (saved prediction differs from the saved label; needs "
        "Scores.with_descriptions(query_labels=..., query_predictions=...) before saving)",
    )
    report.add_argument("--top", type=int, default=5, metavar="K", help="examples per query and direction (default 5)")
    report.add_argument("--html", metavar="OUT", help="write a self-contained HTML report to OUT instead of printing")
    info = commands.add_parser(
        "info",
        help="describe a saved curvature, gradient store or scores directory",
        description="What a directory written by Curvature.save, hookinf.log or Scores.save holds.",
    )
    info.add_argument("path", metavar="PATH", help="the directory")
    info.add_argument(
        "--verify",
        action="store_true",
        help="also read every shard of a gradient store and check its SHA-256, its tensors and that no id repeats "
        "(curvatures and scores are always checked when loaded); exit status 1 naming the first damaged file",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the sub-command; returns the exit status."""
    args = _parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "demo":
            from hookinf.demo import run

            run(seed=args.seed, epochs=args.epochs, console=console)
        elif args.command == "report":
            _report(args, console)
        elif args.command == "info":
            _info(Path(args.path), console, verify=args.verify)
    except HookinfError as err:
        print(f"hookinf {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace, console: Console) -> None:
    if args.queries is not None and args.queries < 0:
        raise HookinfError(f"--queries {args.queries}: the number of queries to detail must be 0 or more.")
    if args.top < 1:
        raise HookinfError(f"--top {args.top}: the number of examples per query and direction must be 1 or more.")
    if args.query and args.queries is not None:
        raise HookinfError("--query ROWS names the queries to detail; leave out --queries N with it.")
    rows = _rows(args.query) if args.query else None
    scores = load_scores(args.scores)
    count = DEFAULT_QUERIES if args.queries is None else args.queries
    queries: int | list[int] = rows if rows is not None else count
    try:
        if args.misclassified:
            queries = misclassified_queries(scores, count)
        chosen = select_queries(scores, queries)  # checks the rows before anything is written
    except ConfigurationError as err:
        option = "--misclassified" if args.misclassified else "--query"
        raise HookinfError(f"{option}: {err}") from err
    if args.html is None:
        console.print(scores_report(scores, queries=chosen, k=args.top))
        return
    try:
        path = scores.save_html(args.html, queries=chosen, k=args.top)
    except OSError as err:
        raise HookinfError(f"{args.html}: cannot write the HTML report ({err.strerror or err}).") from err
    console.print(f"wrote the HTML report of {args.scores} to {path}", highlight=False, soft_wrap=True)


def _rows(values: list[str]) -> list[int]:
    """``--query 3,17 --query 5`` → ``[3, 17, 5]``."""
    rows: list[int] = []
    for value in values:
        for item in value.split(","):
            try:
                rows.append(int(item.strip()))
            except ValueError as err:
                raise HookinfError(
                    f"--query {value}: {item.strip()!r} is not a query row; give rows as integers, e.g. --query 3,17."
                ) from err
    return rows


def _info(path: Path, console: Console, *, verify: bool = False) -> None:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise HookinfError(f"{path}: not a hookinf curvature, gradient store or scores directory (no manifest.json).")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        kind = data.get("format")
    except (OSError, ValueError, AttributeError) as err:
        raise HookinfError(f"{manifest}: unreadable manifest ({err}).") from err
    if kind == "hookinf.gradient-store":
        _store_info(path, console, verify)
        return
    if kind == "hookinf.curvature":
        from hookinf.curvature import load

        console.print(load(path))
    elif kind == "hookinf.scores":
        scores = load_scores(path)
        console.print(scores)
        if scores.descriptions is not None:
            console.print(f"descriptions: {', '.join(scores.descriptions.present())}", highlight=False, soft_wrap=True)
    else:
        raise HookinfError(f"{manifest}: unknown format {kind!r}.")
    if verify:  # loading checked everything there is to check
        console.print(
            "verified: the manifest and the tensor file match their checksums"
            if "tensors_sha256" in data
            else "verified what can be: saved before checksums were recorded (the structure and the tensor file "
            "name's hash, if any, match)",
            highlight=False,
            soft_wrap=True,
        )


def _store_info(path: Path, console: Console, verify: bool) -> None:
    from hookinf.store import GradientStore

    store = GradientStore(path)
    console.print(store, highlight=False, soft_wrap=True)
    shards = len(store.shards)
    console.print(
        f"compressor: {_compressor_text(store.compressor)}; dtype: {store.dtype}; "
        f"{shards} shard{'' if shards == 1 else 's'}",
        highlight=False,
        soft_wrap=True,
    )
    ids = store.ids
    if isinstance(ids, list) and ids:
        console.print(f"ids: {len(ids)} strings ({ids[0]!r} … {ids[-1]!r} in storage order)", soft_wrap=True)
    elif isinstance(ids, torch.Tensor) and len(ids):
        console.print(f"ids: {int(ids.min())} … {int(ids.max())} ({len(ids)} examples)")
    if verify:
        check = store.verify()
        console.print(
            f"verified: {check.shards} shards read in full ({check.bytes:,} bytes), {check.examples} examples, every "
            f"id once; {check.checksummed} SHA-256 checksums match"
            + (
                f", {check.shards - check.checksummed} shards predate checksums"
                if check.checksummed < check.shards
                else ""
            ),
            highlight=False,
            soft_wrap=True,
        )
        if check.unlisted:
            unlisted = ", ".join(check.unlisted)
            console.print(f"not part of the store (unlisted shard files, ignored): {unlisted}", soft_wrap=True)


def _compressor_text(config: dict[str, object]) -> str:
    """A saved compressor configuration as the call that makes it (``LoGra(r_in=16, r_out=16, ...)``)."""
    from hookinf.compress import from_config

    try:
        return repr(from_config(config))
    except HookinfError:  # a kind this hookinf does not know: its fields as they are
        return ", ".join(f"{key}={value!r}" for key, value in config.items())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
