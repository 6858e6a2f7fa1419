"""The ``hookinf`` console script (also ``python -m hookinf``).

Commands: ``demo`` (the embedded default), ``report SCORES_DIR [--html OUT]`` (a terminal or self-contained HTML
report of saved scores), ``info PATH [--verify]`` (what a saved curvature, gradient store or scores directory holds;
``--verify`` also reads every file of a store and checks its checksum). A missing or corrupt file is one line on
stderr naming the path and what is wrong, and exit status 1 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from hookinf.errors import HookinfError
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
        description="Train an MLP on scikit-learn's bundled digits with 10%% flipped labels and report the "
        "suspects, the detection AUC per method and each layer's share of influence.",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, flips and training (default 0)")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    report = commands.add_parser(
        "report",
        help="print (or write as HTML) a report of scores saved with Scores.save",
        description="Per-layer shares, how concentrated influence is, and the most harmful and helpful training "
        "examples of the queries with the largest total |influence|. With --html, writes the report with its "
        "plots as one self-contained HTML file instead (needs matplotlib: pip install 'hookinf[report]').",
    )
    report.add_argument("scores", metavar="SCORES_DIR", help="a directory written by Scores.save")
    report.add_argument(
        "--queries",
        type=int,
        default=3,
        metavar="N",
        help="detail the N queries with the largest total |influence| (default 3)",
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
            _report(args.scores, args.queries, args.top, args.html, console)
        elif args.command == "info":
            _info(Path(args.path), console, verify=args.verify)
    except HookinfError as err:
        print(f"hookinf {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


def _report(directory: str, queries: int, top: int, html: str | None, console: Console) -> None:
    if queries < 0:
        raise HookinfError(f"--queries {queries}: the number of queries to detail must be 0 or more.")
    if top < 1:
        raise HookinfError(f"--top {top}: the number of examples per query and direction must be 1 or more.")
    scores = load_scores(directory)
    if html is None:
        console.print(scores_report(scores, queries=queries, k=top))
        return
    try:
        path = scores.save_html(html, queries=queries, k=top)
    except OSError as err:
        raise HookinfError(f"{html}: cannot write the HTML report ({err.strerror or err}).") from err
    console.print(f"wrote the HTML report of {directory} to {path}", highlight=False, soft_wrap=True)


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
        console.print(load_scores(path))
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
    console.print(store)
    console.print(f"compressor: {store.compressor}; dtype: {store.dtype}; {len(store.shards)} shards")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
