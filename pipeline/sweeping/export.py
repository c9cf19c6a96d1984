"""What a sweep leaves behind: the best trial per kind as a runnable train config, and a table.

Choices use validation accuracy only; test accuracy is reported, never used to choose. Ties
go to the earlier trial in the sweep's order, so the choice is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.config.sweep_config import SweepConfig
from pipeline.sweeping.jobs import adapter_entry
from pipeline.sweeping.space import Trial
from pipeline.training.members import layer_label


def best_per_kind(rows: list[dict]) -> dict[str, dict]:
    """rows in sweep order -> {kind: best row by validation accuracy}; a trial that pruning
    stopped early is never the best (its accuracy is that of a shorter training), nor one that
    diverged (non-finite logits: its accuracy counts only the samples it still scored)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["metrics"].get("pruned_at") is not None or r["metrics"].get("diverged"):
            continue
        kind = r["config"]["kind"]
        if kind not in best or r["metrics"]["val_acc"] > best[kind]["metrics"]["val_acc"]:
            best[kind] = r
    return best


def write_best_train_config(cfg: SweepConfig, best: dict[str, dict], path: Path) -> None:
    """A train config with one adapter entry per kind: the winning configuration, same seed."""
    entries = []
    for r in best.values():
        c = r["config"]
        entries.append(adapter_entry(Trial(r["trial"], c["kind"], c["hparams"], c["lr"], c["weight_decay"], c["seed"])))
    store = {"store": cfg.store, **({"storage_options": cfg.storage_options} if cfg.storage_options else {})}
    # Without `pruning`: the winners are retrained to the end, not ranked against each other.
    settings = {k: v for k, v in cfg.train_settings().items() if k != "pruning"}
    data = {**store, "output": str(Path(cfg.output) / "best"), **settings, "adapters": entries}
    header = [f"# python -m pipeline train {path}",
              f"# The best configuration per adapter kind from the sweep in {cfg.output} (by validation accuracy):"]
    header += [f"#   {kind}: val {_pct(r['metrics']['val_acc'])}, test {_pct(r['metrics']['test_acc'])} (trial {r['trial']})"
               for kind, r in best.items()]
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False))


def results_markdown(rows: list[dict], best: dict[str, dict]) -> str:
    lines = ["| trial | kind | layer | hparams | lr | wd | seed | params | val acc | test acc | train s | stopped at epoch |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["metrics"]["val_acc"]):
        c, m = r["config"], r["metrics"]
        arch = {k: v for k, v in c["hparams"].items() if k not in ("layer", "layers")}
        lines.append(f"| {r['trial']} | {c['kind']} | {layer_label(c['hparams'])} | {json.dumps(arch) if arch else '-'} | {c['lr']:g} | "
                     f"{c['weight_decay']:g} | {c['seed']} | {m['params']:,} | {_pct(m['val_acc'])} | {_pct(m['test_acc'])} | {m['train_s']:.1f} | "
                     f"{m.get('pruned_at') or '-'}{' (diverged)' if m.get('diverged') else ''} |")
    lines += ["", "**Best per kind** (by validation accuracy):", ""]
    for kind, r in best.items():
        lines.append(f"- {kind}: trial {r['trial']} ({r['member']}): val {_pct(r['metrics']['val_acc'])}, test {_pct(r['metrics']['test_acc'])}")
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"
