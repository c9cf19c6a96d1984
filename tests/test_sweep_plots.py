"""The sweep's score plots: what is drawn, read back from matplotlib's own artists."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from pipeline.sweeping.plots import plot_scores


def row(kind: str, lr: float, acc: float, pruned_at: int | None) -> dict:
    return {"config": {"kind": kind, "lr": lr, "weight_decay": 0.0, "seed": 0, "hparams": {}},
            "metrics": {"val_acc": acc, "pruned_at": pruned_at}}


def test_stopped_trials_are_hollow_and_apart(tmp_path, monkeypatch):
    rows = [row("linear", 1e-3, 0.90, None), row("linear", 1e-2, 0.60, 1), row("inca", 3e-3, 0.80, 3), row("inca", 1e-3, 0.95, None)]
    drawn = {}
    real = Figure.savefig

    def capture(fig, path, **kw):  # every scatter series by its legend label, before the figure is closed
        ax = fig.axes[0]
        drawn[str(path).rsplit("/", 1)[-1]] = {c.get_label(): (np.asarray(c.get_offsets()).tolist(), c.get_facecolors())
                                                for c in ax.collections}
        return real(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", capture)
    matplotlib.use("Agg")
    paths = plot_scores(rows, tmp_path)
    assert [p.name for p in paths] == ["score_vs_lr.png"]  # weight decay and seed did not vary
    series = drawn["score_vs_lr.png"]
    assert sorted(series) == ["inca", "inca, stopped at a rung", "linear", "linear, stopped at a rung"]
    assert series["linear"][0] == [[1e-3, 90.0]] and series["linear, stopped at a rung"][0] == [[1e-2, 60.0]]
    assert series["inca"][0] == [[1e-3, 95.0]] and series["inca, stopped at a rung"][0] == [[3e-3, 80.0]]
    for label, (_, faces) in series.items():
        hollow = len(faces) == 0 or float(faces[:, 3].max()) == 0.0
        assert hollow == label.endswith("stopped at a rung"), label
