"""`python -m distres.report RUN_DIR`: the run's curves, summary table, ledgers and profile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distres.results.report import ledger_tables, plot_curves, profile_lines, summary_table


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from distres.results import ledger
    from distres.results import per_class as class_metrics

    parser = argparse.ArgumentParser(prog="python -m distres.report", description=__doc__)
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)

    try:
        out = plot_curves(run_dir)
        table = summary_table(run_dir)
        ledgers = []
        for path in ledger.find(run_dir / ledger.LEDGER_DIR):
            summary = ledger.read_summary(path)
            pictures = class_metrics.draw(summary, run_dir / "plots")
            ledgers.append((path, ledger_tables(summary), pictures))
        profile = profile_lines(run_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"distres.report: {e}", file=sys.stderr)
        return 2
    console = Console()
    console.print(table)
    console.print(f"curves: {out}", highlight=False)
    for path, tables, pictures in ledgers:
        console.print(f"ledger: {path}", highlight=False)
        for t in tables:
            console.print(t)
        for name, picture in pictures.items():
            console.print(f"{name}: {picture}", highlight=False)
    for line in profile:
        console.print(line, highlight=False, markup=False)
    return 0
