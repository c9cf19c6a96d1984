"""score_vs_<hparam>.png: validation accuracy of every trial against each hyperparameter that varied.

One colour per adapter kind; a trial that pruning stopped at a rung is a hollow marker, its
accuracy being that of fewer epochs (a slow start, not necessarily a bad configuration).
Learning rate and weight decay are on a log axis (symlog when a weight decay of 0 was tried);
other numbers on a linear one; anything else (layer names, layer sets, pooling modes) is
categorical.
"""

from __future__ import annotations

import json
from pathlib import Path

LOG_AXES = ("lr", "weight_decay")


def hparam_values(row: dict) -> dict:
    c = row["config"]
    return {"lr": c["lr"], "weight_decay": c["weight_decay"], "seed": c["seed"], **c["hparams"]}


def plot_scores(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in hparam_values(r)})
    kinds = sorted({r["config"]["kind"] for r in rows})
    paths = []
    for key in keys:
        points = [(r["config"]["kind"], hparam_values(r)[key], r["metrics"]["val_acc"], r["metrics"].get("pruned_at") is not None)
                  for r in rows if key in hparam_values(r)]
        distinct = {json.dumps(v) for _, v, _, _ in points}
        if len(distinct) < 2:
            continue
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for _, v, _, _ in points)
        categories = sorted(distinct)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, kind in enumerate(kinds):
            for stopped in (False, True):
                mine = [(v, acc) for k, v, acc, s in points if k == kind and s == stopped]
                if not mine:
                    continue
                xs = [v if numeric else categories.index(json.dumps(v)) for v, _ in mine]
                style = {"facecolors": "none", "edgecolors": f"C{i}"} if stopped else {"color": f"C{i}"}
                ax.scatter(xs, [100 * acc for _, acc in mine], label=f"{kind}, stopped at a rung" if stopped else kind, alpha=0.75, **style)
        if numeric and key in LOG_AXES:
            positive = [v for _, v, _, _ in points if v > 0]
            if len(positive) == len(points):
                ax.set_xscale("log")
            else:
                ax.set_xscale("symlog", linthresh=min(positive, default=1e-6))
        if not numeric:
            ax.set_xticks(range(len(categories)))
            ax.set_xticklabels([_label(json.loads(c)) for c in categories], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"Sweep: validation accuracy vs {key} ({len(points)} trials)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"score_vs_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _label(value) -> str:
    return "+".join(map(str, value)) if isinstance(value, list) else str(value)
