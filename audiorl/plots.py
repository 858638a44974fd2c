"""Pictures a person reads faster than tables: WER per test set, before and after."""

from __future__ import annotations

from collections.abc import Mapping


def wer_chart(wers: Mapping[str, Mapping[str, float]], title: str = "WER per test set"):
    """A grouped bar chart: one group per test set, one bar per model ({"set": {"before": 0.3,
    "after": 0.2}}), the value printed on each bar. Returns a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    sets = list(wers)
    labels = list(dict.fromkeys(label for per_set in wers.values() for label in per_set))
    fig = Figure(figsize=(max(4.0, 1.6 * len(sets) + 2), 3.6))
    ax = fig.subplots()
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(sets))]
        ys = [wers[s].get(label, float("nan")) for s in sets]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, labels=[f"{y:.3f}" if y == y else "" for y in ys], fontsize=8, padding=2)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylabel("WER")
    ax.set_title(title)
    ax.set_ylim(0, max([v for per_set in wers.values() for v in per_set.values() if v == v] + [0.01]) * 1.2)
    ax.legend()
    fig.tight_layout()
    return fig
