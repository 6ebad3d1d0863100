"""What `distres.report` shows of a run directory, and training draws at its end: the curves
(plots/curves.png), a summary table; with a ledger (tracking.ledger=true, distres.evaluate
--ledger), the per-class table and the most-confused pairs; with a profile
(tracking.profile_steps), where the step time went.

The curves come from metrics.jsonl (train loss and val loss, lr, val top-1 against the
optimizer step); the table from summary.json and the evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path

PLOT = Path("plots") / "curves.png"


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a distres run dir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: str | Path) -> Path:
    """Loss, lr and top-1 against step, three panels, written to <run_dir>/plots/curves.png."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display under Slurm or in CI
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_records(run_dir)
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, (ax_loss, ax_lr, ax_top1) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    ax_loss.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train")
    ax_loss.plot([r["step"] for r in evals], [r["val/loss"] for r in evals], "o-", label="val")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set(xlabel="step", ylabel="lr", title="learning rate")
    ax_top1.plot([r["step"] for r in evals], [r["val/top1"] for r in evals], "o-", label="top-1")
    ax_top1.plot([r["step"] for r in evals], [r["val/top5"] for r in evals], "s--", label="top-5")
    ema = [r for r in evals if "val_ema/top1" in r]
    if ema:
        ax_top1.plot(
            [r["step"] for r in ema], [r["val_ema/top1"] for r in ema], "^-", label="EMA top-1"
        )
    ax_top1.set(xlabel="step", ylabel="accuracy", title="validation", ylim=(0, 1))
    ax_top1.legend()
    fig.suptitle(run_dir.name)
    out = run_dir / PLOT
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summary_table(run_dir: Path):
    from rich.table import Table

    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    evals = [r for r in read_records(run_dir) if r.get("event") == "eval"]
    table = Table(title=f"{run_dir}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")

    def pct(v):
        return f"{100 * v:.2f}%" if isinstance(v, float) else "-"

    rows = [
        ("model", summary.get("model", "-")),
        ("stop", summary.get("stop_reason", "(running or killed)")),
        ("steps / epochs", f"{summary.get('steps', '-')} / {summary.get('epochs', '-')}"),
        ("samples seen", f"{summary.get('samples_seen', '-')}"),
        (
            "world size x global batch",
            f"{summary.get('world_size', '-')} x {summary.get('global_batch', '-')}",
        ),
        ("final val top-1", pct(summary.get("final_val_top1"))),
        ("best val top-1", pct(summary.get("best_val_top1"))),
        ("final val top-5", pct(summary.get("final_val_top5"))),
        (
            "final val loss",
            f"{summary['final_val_loss']:.4f}"
            if summary.get("final_val_loss") is not None
            else "-",
        ),
        ("evaluations", str(len(evals))),
        ("wall time", f"{summary['wall_s']:.1f} s" if "wall_s" in summary else "-"),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    return table


def ledger_tables(summary: dict, worst: int = 10):
    """The per-class table (every class up to 20 of them, else the `worst` by top-1) and the
    most-confused pairs of a ledger's summary, as rich tables."""
    from rich.table import Table

    names = summary["classes"]
    classes = [r for r in summary["per_class"] if r["support"]]
    title = f"{summary['split']}: per class"
    if len(classes) > 20:
        classes = sorted(classes, key=lambda r: (r["top1"], -r["support"]))[:worst]
        title += f" (the {worst} worst of {len(summary['per_class'])})"
    per_class = Table(title=title)
    for column in ("class", "support", "top-1", "top-5", "loss", "confused with"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for r in classes:
        other = r["confused_with"]
        per_class.add_row(
            r["name"],
            str(r["support"]),
            f"{r['top1']:.4f}",
            f"{r['top5']:.4f}",
            f"{r['loss']:.4f}",
            f"{names[other]} ({r['confused_count']})" if other is not None else "-",
        )
    pairs = Table(title=f"{summary['split']}: most confused (true -> predicted)")
    for column in ("true", "predicted", "count", "of true"):
        pairs.add_column(column, justify="left" if column in ("true", "predicted") else "right")
    support = [r["support"] for r in summary["per_class"]]
    for true, pred, n in summary["most_confused"][:10]:
        pairs.add_row(names[true], names[pred], str(n), f"{100 * n / support[true]:.1f}%")
    return per_class, pairs


def profile_lines(run_dir: Path) -> list[str]:
    """The last profile's table (tracking.profile_steps), if the run wrote one."""
    from distres.components.profiling import table

    profiles = [r for r in read_records(run_dir) if r.get("event") == "profile"]
    return table(profiles[-1]).splitlines() if profiles else []
