"""Results a person would look at: a markdown table, the same as JSON, and a plot per layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def write_report(out: Path, rows: list[dict], summary: dict, layer_order: Optional[list[str]]) -> None:
    """results.json, results.md, and accuracy_by_layer.png unless layer_order is None (no plot)."""
    (out / "results.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    (out / "results.md").write_text(results_markdown(rows, summary))
    if layer_order is not None:
        plot_accuracy_by_layer(rows, layer_order, out / "accuracy_by_layer.png")


def results_markdown(rows: list[dict], summary: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    lines = [
        "| adapter | kind | layer | params | % of backbone | val acc | test acc | train s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    by_id = {r["member_id"]: r for r in rows}
    for r in (by_id[i] for i in summary["ranking"]):  # the trainer's one ranking: top-1 first
        share = "-" if r["pct_backbone"] is None else f"{r['pct_backbone']:.3f}"
        train = f"{r['train_s']:.1f}" + (f" (fused x{r['fused_with']})" if r["fused_with"] > 1 else "")
        name = r["adapter"] + (" (diverged)" if r["diverged"] else "")
        lines.append(f"| {name} | {r['kind']} | {r['layer']} | {r['params']:,} | {share} | {pct(r['val_acc'])} | {pct(r['test_acc'])} | {train} |")
    top, ens, greedy = summary["top1"], summary["ensemble"], summary["greedy"]
    if top is None:
        lines += ["", "**Every member diverged** (non-finite validation logits): no top-1, no ensemble, nothing saved; "
                      "lower the learning rates or weight decays"]
    else:
        lines += [
            "",
            f"**Top-1 by validation**: {top['adapter']}: val {pct(top['val_acc'])}, test {pct(top['test_acc'])}",
            f"**Ensemble of the top {len(ens['members'])}** (temperature-calibrated softmax averaged): val {pct(ens['val_acc'])}, "
            f"test {pct(ens['test_acc'])}",
            f"**Greedy ensemble** (calibrated; forward selection with replacement on validation, {sum(greedy['weights'])} picks of "
            f"{len(greedy['members'])} members): val {pct(greedy['val_acc'])}, test {pct(greedy['test_acc'])}",
        ]
    lines += [f"Training time, all adapters: {summary['train_seconds_total']:.1f} s (forward/backward/step; reading excluded)"]
    return "\n".join(lines) + "\n"


def plot_accuracy_by_layer(rows: list[dict], layer_order: list[str], path: Path) -> None:
    """Best validation and test accuracy per layer, one line per single-layer adapter kind;
    multi-layer kinds (LoSA, VQT) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(layer_order) + 3), 4.2))
    kinds = sorted({r["kind"] for r in rows})
    for kind in kinds:
        mine = [r for r in rows if r["kind"] == kind]
        if all(r["layer"] in layer_order for r in mine):
            xs = [l for l in layer_order if any(r["layer"] == l for r in mine)]
            best = [max((r for r in mine if r["layer"] == l), key=lambda r: r["val_acc"]) for l in xs]
            pos = [layer_order.index(l) for l in xs]
            line, = ax.plot(pos, [100 * b["val_acc"] for b in best], marker="o", label=f"{kind} (val)")
            if all(b["test_acc"] is not None for b in best):
                ax.plot(pos, [100 * b["test_acc"] for b in best], marker="x", linestyle="--", color=line.get_color(), label=f"{kind} (test)")
        else:
            best = max(mine, key=lambda r: r["val_acc"])
            ax.axhline(100 * best["val_acc"], linestyle=":", label=f"{kind} on {best['layer']} (val)", color=f"C{len(ax.lines) % 10}")
    ax.set_xticks(range(len(layer_order)))
    ax.set_xticklabels(layer_order, rotation=45, ha="right")
    ax.set_xlabel("cached layer (shallow to deep)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Adapter accuracy per cached layer\n(per layer, the best learning rate on validation)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
