"""The ``hookinf`` console script (also ``python -m hookinf``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the sub-command; returns the exit status."""
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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from hookinf.demo import run

        run(seed=args.seed, epochs=args.epochs)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
