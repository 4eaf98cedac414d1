"""``fashionserve active select`` and ``fashionserve active experiment``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fashionserve.cli.command import add_command, add_group
from fashionserve.data.catalog import TRENDS

STRATEGIES = ("margin", "entropy", "kcenter", "hybrid", "random")  # active.select.STRATEGIES


def add_commands(subparsers: Any) -> None:
    """Add the ``active`` commands to the ``fashionserve`` command line."""
    group = add_group(subparsers, "active", "active learning: pick what to label")
    p = add_command(
        group,
        "select",
        _select,
        "pick the garments worth labelling from capture files and bulk output",
        error_status=2,
    )
    p.add_argument("--source", type=Path, required=True, help="capture or bulk output folder")
    p.add_argument("--budget", type=int, required=True, help="garments to label")
    p.add_argument("--strategy", choices=STRATEGIES, default="hybrid")
    p.add_argument("--out", type=Path, required=True, help="the task file to write")
    p.add_argument("--format", choices=["label-studio", "coco"], default="label-studio")
    p.add_argument("--seed", type=int, default=0, help="random and kcenter draw with it")
    p.add_argument(
        "--recall-report",
        type=Path,
        help="report.json of `fashionserve evaluate --report`: hybrid weighs classes of "
        "low recall more",
    )
    p.add_argument("--taxonomy", type=Path, help="taxonomy YAML (default: the packaged one)")

    p = add_command(
        group,
        "experiment",
        _experiment,
        "the loop measured on synthetic data: hybrid against random selection",
    )
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    p.add_argument("--workdir", type=Path, required=True, help="data sets and runs go here")
    p.add_argument("--budget", type=int, default=300, help="garments labelled per strategy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of the tagger")
    p.add_argument(
        "--trend",
        choices=sorted(TRENDS),
        help="traffic and held-out products show this trend, which training never had",
    )


def _select(args: argparse.Namespace) -> int:
    from fashionserve.active.select import run_select
    from fashionserve.taxonomy import load_taxonomy

    chosen = run_select(
        args.source,
        args.budget,
        args.strategy,
        args.out,
        args.format,
        load_taxonomy(args.taxonomy),
        seed=args.seed,
        recall_report=args.recall_report,
    )
    print(f"wrote {len(chosen)} garments to label ({args.strategy}) to {args.out}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from fashionserve.active.experiment import run_experiment

    run_experiment(
        args.checkpoints, args.workdir, args.budget, args.seed, args.steps, trend=args.trend
    )
    return 0
