"""pruning: successive halving of the members a run trains together (ASHA's promotion rule).

The oracle is the same members trained without pruning: from its per-epoch validation
accuracies, the promotion rule applied by hand says which member stops where; a stopped
member must end at its best state up to that epoch, and the others exactly as unpruned."""

import json

import pytest

from pipeline.config import ConfigError
from pipeline.runners.train import run_train
from tests.test_train import train_config

# Learning rates far apart, so that the members' accuracies differ after an epoch.
ADAPTERS = [{"kind": "linear", "layers": ["blocks.0"], "lr": [1e-5, 1e-4, 1e-3, 3e-2]}]


def val_curves(out) -> dict[str, list[float]]:
    curves: dict[str, list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_acc" in row:
            curves.setdefault(row["member_id"], []).append(row["val_acc"])
    return curves


def by_hand(curves: dict[str, list[float]], rungs: list[int], eta: int) -> dict[str, int]:
    """Which member stops at which rung: keep the values >= the k-th best, k = max(n // eta, 1)."""
    alive, stopped = set(curves), {}
    for rung in rungs:
        best = {m: max(curves[m][:rung]) for m in alive}
        threshold = sorted(best.values(), reverse=True)[max(len(best) // eta, 1) - 1]
        for m, value in best.items():
            if value < threshold:
                stopped[m] = rung
        alive -= set(stopped)
    return stopped


def test_stopped_members_end_at_their_rung_and_the_others_train_on_exactly(colour_store, tmp_path, float64_training):
    settings = {"epochs": 4, "val_split": "val", "test_split": None}
    full = run_train(train_config(colour_store, tmp_path / "full", ADAPTERS, **settings))
    pruned = run_train(train_config(colour_store, tmp_path / "pruned", ADAPTERS, **settings,
                                    pruning={"min_epochs": 1, "reduction_factor": 2}))
    curves = val_curves(tmp_path / "full")
    expected = by_hand(curves, rungs=[1, 2], eta=2)
    assert expected, f"the learning rates should spread the accuracies: {curves}"
    rows = {r["member_id"]: r for r in pruned["rows"]}
    assert {m: r["pruned_at"] for m, r in rows.items() if r["pruned_at"] is not None} == expected
    full_rows = {r["member_id"]: r for r in full["rows"]}
    for m, row in rows.items():
        if m in expected:
            assert row["val_acc"] == max(curves[m][:expected[m]])  # its best state up to the rung
            assert list(row["rung_acc"]) == [str(r) for r in (1, 2) if r <= expected[m]]
        else:
            assert row["val_acc"] == full_rows[m]["val_acc"]  # trained on as if never fused with the stopped
    # Stopped members are not trained or validated after their rung.
    pruned_curves = val_curves(tmp_path / "pruned")
    assert {m: len(c) for m, c in pruned_curves.items()} == {m: expected.get(m, 4) for m in curves}


def test_earlier_values_at_a_rung_can_stop_every_member(colour_store, tmp_path):
    """A sweep's history: ten trials reached 1.0 at epoch 1, so the top half is 1.0; members
    below stop there, and with none left the run ends after that epoch."""
    cfg = train_config(colour_store, tmp_path / "run", [{"kind": "linear", "layers": ["blocks.0"], "lr": [1e-6, 2e-6]}],
                       epochs=4, val_split="val", test_split=None, pruning={"min_epochs": 1, "reduction_factor": 2}, rung_history={"1": [1.0] * 10})
    result = run_train(cfg)
    assert all(r["val_acc"] < 1.0 for r in result["rows"])
    assert [r["pruned_at"] for r in result["rows"]] == [1, 1]
    assert len(result["summary"]["epoch_seconds"]) == 1


def test_pruning_problems_name_their_keys(colour_store, tmp_path):
    with pytest.raises(ConfigError) as e:
        train_config(colour_store, tmp_path / "x", ADAPTERS, pruning={"min_epochs": 0, "reduction_factor": 1})
    assert "pruning.min_epochs: got 0, expected >= 1" in str(e.value)
    assert "pruning.reduction_factor: got 1, expected an integer >= 2" in str(e.value)
