"""PNG plots: p50 latency and throughput against concurrency, a line per target (matplotlib, Agg).

One figure per shape: a column per strategy, latency on top, tokens/s below. Our server's targets
are solid lines; engine-only dashed; the server at --max-batch-size 1 and CTranslate2 direct
dotted; ONNX Runtime int8 (greedy, c requests per call) dash-dotted; Transformers (one request at a time, so no concurrency) a horizontal grey line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.suite.figures import Figures, Measurement, aggregate
from benchmarks.suite.matrix import Kind, Plan

STYLE = {Kind.SERVER: "-", Kind.ENGINE: "--", Kind.SERVER_B1: ":", Kind.CT2: ":", Kind.ONNX: "-."}


def plot_shape(plan: Plan, shape: str, measurements: Sequence[Measurement], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [f for f in aggregate(measurements) if f.shape == shape]
    # One colour per contender in every panel, so a line is the same thing across strategies.
    names = sorted({f.contender for f in figures if f.kind is not Kind.HF})
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    columns = len(plan.strategies)
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), squeeze=False)
    for col, strategy in enumerate(plan.strategies):
        mine = [f for f in figures if f.strategy == strategy.name]
        latency_ax, throughput_ax = axes[0][col], axes[1][col]
        lines: dict[str, list[Figures]] = {}
        for f in mine:
            if f.kind is not Kind.HF:
                lines.setdefault(f.contender, []).append(f)
        for name, points in sorted(lines.items()):
            points.sort(key=lambda f: f.concurrency)
            xs = [f.concurrency for f in points]
            style = STYLE[points[0].kind]
            colour = colours[name]
            latency_ax.plot(xs, [f.p50_ms for f in points], style, color=colour, marker="o", label=name)
            throughput_ax.plot(
                xs, [f.tokens_per_s for f in points], style, color=colour, marker="o", label=name
            )
        for f in mine:
            if f.kind is Kind.HF:
                latency_ax.axhline(f.p50_ms, color="grey", linewidth=1, label="transformers (one at a time)")
                throughput_ax.axhline(
                    f.tokens_per_s, color="grey", linewidth=1, label="transformers (one at a time)"
                )
        for ax, label in ((latency_ax, "p50 latency, ms"), (throughput_ax, "generated tokens/s")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(plan.concurrency), [str(c) for c in plan.concurrency])
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        latency_ax.set_title(f"{shape}, {strategy.name}" + ("" if mine else " (not measured)"))
        if throughput_ax.get_legend_handles_labels()[0]:
            throughput_ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
