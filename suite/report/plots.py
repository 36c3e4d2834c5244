"""Loss curves of a training scenario: validation loss against model FLOPs and against training
walltime, one line per variant (one colour per configuration: its seeds share it), the quality
target as a horizontal line. The picture behind the
"cost to reach validation loss" table (quality.py), drawn as one PNG per scenario beside the
markdown report and linked from it.

matplotlib is optional (the ``dev`` extra): without it, or when the report goes to stdout (no file to
put a PNG beside), the report says in one line that the plot was not drawn.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

from suite.report import plugins
from suite.report.quality import group_name, repeat_groups
from suite.report.select import baseline_of, is_ok, metric


def curve(rec: dict) -> list[list]:
    """[step, loss, walltime_s, flops, phase] points: a plug-in's fuller curve where it keeps one (a
    technique whose phases train other models than the final one), else the record's validation_curve."""
    points = plugins.curve(rec) or [p[:4] + [0] for p in metric(rec, "validation_curve") or [] if len(p) >= 4]
    return [p for p in points if None not in p[1:4]]  # null: a loss that was not finite


def figure_name(scenario: str, report: Path) -> str:
    """'<report stem>-<scenario>.png': reports of one folder that render the same scenario keep their own."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{report.stem}-{scenario}") + ".png"


def loss_curves(scenario: str, records: list[dict], target: float | None, report: Path | None) -> list[str]:
    """Draws the PNG beside `report` (the markdown file) and returns the markdown line that shows it, or
    says why it was not drawn. For scenarios with a cost-to-reach table (curves with FLOPs and walltime)."""
    if report is None:
        return ["Loss curves not drawn: the report went to stdout (write it with `-o FILE.md` for the PNG)."]
    name = figure_name(scenario, report)
    if not draw(report.parent / name, scenario, records, target):
        return ["Loss curves not drawn: matplotlib is not installed (`pip install -e '.[dev]'`)."]
    return [f"![{scenario}: validation loss vs model FLOPs and vs training walltime]({name})"]


def draw(path: Path, title: str, records: list[dict], target: float | None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write the file only
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    base = baseline_of(records)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    phase_ends = False
    others = (f"C{i}" for i in itertools.count())  # matplotlib's default colours; the baseline is black
    curves = {id(r): curve(r) for r in records if is_ok(r)}
    ok = [r for r in records if curves.get(id(r))]
    colors, labels = {}, {}
    for members in repeat_groups(ok):  # seeds of one configuration share a colour and a legend entry
        color = "black" if any(r is base for r in members) else next(others)
        tags = (["baseline"] if color == "black" else []) + ([f"{len(members)} seeds"] if len(members) > 1 else [])
        for i, r in enumerate(members):
            colors[id(r)] = color
            labels[id(r)] = (group_name(members) + (f" ({', '.join(tags)})" if tags else "")) if i == 0 else None
    losses = sorted(p[1] for r in ok for p in curves[id(r)])
    for rec in ok:
        points = curves[id(rec)]
        color, label = colors[id(rec)], labels[id(rec)]
        width = 2.2 if color == "black" else 1.4
        # the last validation of every phase but the final one: where a multi-phase run changes model
        ends = [p for p, q in zip(points, points[1:]) if q[4] != p[4]]
        for ax, x in zip(axes, (3, 2)):  # model FLOPs, walltime
            ax.plot([p[x] for p in points], [p[1] for p in points], color=color, linewidth=width, marker="o",
                    markersize=3, label=label, zorder=3 if rec is base else 2)
            if ends:
                ax.plot([p[x] for p in ends], [p[1] for p in ends], linestyle="none", marker="D", markersize=7,
                        markerfacecolor="white", markeredgecolor=color, zorder=4)
        phase_ends = phase_ends or bool(ends)
    for ax in axes:
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.4f}")
        ax.grid(True, alpha=0.3)
    if phase_ends:
        axes[0].plot([], [], linestyle="none", marker="D", markerfacecolor="white", markeredgecolor="black",
                     label="end of a phase")
    if losses:  # loss spikes and the first validations would squeeze the part where variants differ
        top = losses[int(0.95 * (len(losses) - 1))]
        bottom = min(losses[0], target if target is not None else losses[0])
        axes[0].set_ylim(bottom - 0.05 * (top - bottom), top)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("model FLOPs (log scale)")
    axes[1].set_xlabel("training walltime (s, validation excluded)")
    axes[0].set_ylabel("validation loss")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
