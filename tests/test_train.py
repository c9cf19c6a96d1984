"""The trainer: learns a learnable task from the cache, fuses without changing results, saves."""

import json

import numpy as np
import pytest
import torch

from cache import ConfigError, open_store
from pipeline.adapters import load_adapter
from pipeline.config import TrainConfig, build
from pipeline.runners.train import _slug, run_train


def train_config(store, out, adapters, **extra):
    data = {"store": store, "output": str(out), "test_split": "val", "epochs": 6, "batch_size": 8,
            "warmup_epochs": 0.5, "adapters": adapters, **extra}
    return build(TrainConfig, data)


def test_learns_and_writes_results(colour_store, tmp_path):
    cfg = train_config(colour_store, tmp_path / "run", [
        {"kind": "linear", "layers": "all", "lr": [0.003, 0.03]},
        {"kind": "inca", "layers": ["blocks.5"], "hparams": {"num_heads": 4}, "lr": 0.003},
        {"kind": "losa", "hparams": {"rank": 4}, "lr": 0.003},
    ])
    results = run_train(cfg)
    rows = results["rows"]
    assert len(rows) == 3 * 2 + 1 + 1
    assert results["summary"]["top1"]["val_acc"] >= 0.9, rows
    assert max(r["test_acc"] for r in rows) >= 0.9
    out = tmp_path / "run"
    for name in ("results.md", "results.json", "accuracy_by_layer.png", "metrics.jsonl", "config.json"):
        assert (out / name).stat().st_size > 0, name
    epochs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"val_acc"' in l]
    assert len(epochs) == 6 * len(rows)
    # The best saved adapter reproduces its reported validation accuracy from the cache.
    best_dir = sorted((out / "adapters").iterdir())[0]
    reader = open_store(colour_store)
    adapter = load_adapter(best_dir, reader.fingerprint).eval()
    feats = reader.read("val", adapter.required_layers(), 0, reader.num_samples("val"))
    acc = float((adapter(feats).argmax(-1) == torch.from_numpy(reader.labels("val"))).float().mean())
    assert acc == pytest.approx(results["summary"]["top1"]["test_acc"])


def test_fused_members_equal_members_trained_alone(colour_store, tmp_path, float64_training):
    """Two learning rates trained in one fused group = each trained in its own run, on
    standardised features (the affine from the store's statistics, shared by the members)."""
    entry = {"kind": "inca", "layers": ["blocks.0"], "hparams": {"num_heads": 2}}
    fused = run_train(train_config(colour_store, tmp_path / "fused", [{**entry, "lr": [0.001, 0.01]}], epochs=2))
    alone = [run_train(train_config(colour_store, tmp_path / f"alone{i}", [{**entry, "lr": lr}], epochs=2))
             for i, lr in enumerate([0.001, 0.01])]
    assert [r["fused_with"] for r in fused["rows"]] == [2, 2]
    # The same member (same id) in both runs: joined by id, not by position or name.
    solo = {single["rows"][0]["member_id"]: single["rows"][0] for single in alone}
    assert sorted(solo) == sorted(r["member_id"] for r in fused["rows"])
    for row in fused["rows"]:
        assert row["val_acc"] == solo[row["member_id"]]["val_acc"]
    # The saved weights agree too: find each learning rate's adapter in both runs by name.
    from safetensors.torch import load_file

    def weights(run_dir, lr):
        (d,) = [d for d in (run_dir / "adapters").iterdir() if f"lr={lr}_" in d.name]
        return load_file(str(d / "adapter.safetensors"))

    for i, lr in enumerate(["0.001", "0.01"]):
        fused_w, alone_w = weights(tmp_path / "fused", lr), weights(tmp_path / f"alone{i}", lr)
        assert fused_w.keys() == alone_w.keys()
        # InCA reads standardised features by default: the fixed affine is saved beside the weights.
        assert any(k.startswith("standardize.") for k in fused_w)
        for k in fused_w:
            assert fused_w[k].dtype == torch.float64
            torch.testing.assert_close(fused_w[k], alone_w[k], atol=1e-10, rtol=1e-9)


def test_carved_validation_split_is_disjoint_and_seeded(colour_store, tmp_path):
    from pipeline.training.splits import resolve_splits as _splits

    cfg = train_config(colour_store, tmp_path, [{"kind": "linear"}], val_split=None, val_fraction=0.25)
    reader = open_store(colour_store)
    s1, s2 = _splits(cfg, reader), _splits(cfg, reader)
    assert not (s1.train_keep & s1.val_keep).any() and (s1.train_keep | s1.val_keep).all()
    assert s1.val_keep.sum() == 12 and (s1.val_keep == s2.val_keep).all()


def test_unknown_layers_and_splits_are_all_named_at_once(colour_store, tmp_path):
    cfg = train_config(colour_store, tmp_path / "a", [{"kind": "linear", "layers": ["blocks.9"]},
                                                      {"kind": "inca", "layers": ["blocks.5", "blk.0"]}])
    with pytest.raises(ConfigError, match=r"\['blocks.9'\] are not in the store") as e:
        run_train(cfg)
    has = "; it has ['embed', 'blocks.0', 'blocks.5']"
    assert e.value.problems == [f"adapters[0].layers: ['blocks.9'] are not in the store{has}",
                                f"adapters[1].layers: ['blk.0'] are not in the store{has}"]
    with pytest.raises(ConfigError) as e:
        run_train(train_config(colour_store, tmp_path / "b", [{"kind": "linear"}], train_split="tr", test_split="tst"))
    assert [p.split(":")[0] for p in e.value.problems] == ["train_split", "test_split"]


def test_lbfgs_probe_predicts_as_sklearn_on_the_same_cache(colour_store, tmp_path):
    """solver=lbfgs: each L2 strength's probe predicts every val sample as scikit-learn's
    LogisticRegression with the equivalent C, fitted on the same pooled, standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    l2s = [1.0, 0.01]
    result = run_train(train_config(colour_store, tmp_path / "out", [{"kind": "linear", "layers": ["blocks.0"], "solver": "lbfgs",
                                                                       "weight_decay": l2s}], val_split="val", test_split=None, save_top=2))
    reader = open_store(colour_store)

    def pooled(split):
        x = reader.read(split, ["blocks.0"], 0, reader.num_samples(split))["blocks.0"][:, 1:].double().mean(1).numpy()
        return x, reader.labels(split)

    (x_train, y_train), (x_val, y_val) = pooled("train"), pooled("val")
    scaler = StandardScaler().fit(x_train)
    by_l2 = {row["weight_decay"]: row for row in result["rows"]}
    assert sorted(by_l2) == sorted(l2s) and all(" lbfgs l2=" in row["adapter"] for row in result["rows"])
    z = scaler.transform(x_train)

    def objective(w, b, l2):  # what both minimise, float64: mean cross-entropy + l2/2 |W|^2 on standardised features
        logits = z @ w.T + b
        top = logits.max(1, keepdims=True)
        nll = (top[:, 0] + np.log(np.exp(logits - top).sum(1)) - logits[np.arange(len(y_train)), y_train]).mean()
        return float(nll + 0.5 * l2 * (w * w).sum())

    from safetensors.torch import load_file

    saved = {d.name: d for d in (tmp_path / "out" / "adapters").iterdir()}
    for l2 in l2s:
        model = LogisticRegression(C=1 / (l2 * len(y_train)), tol=1e-10, max_iter=10000).fit(z, y_train)
        expected = float((model.predict(scaler.transform(x_val)) == y_val).mean())
        assert by_l2[l2]["val_acc"] == expected  # the whole val split (nothing carved), as sklearn's
        # The same optimum, not only the same predictions (saturated on this data, whatever l2 it fitted):
        # the saved head acts on raw pooled features; unfolded onto the standardised ones.
        (name,) = [n for n in saved if n.endswith(f"l2={l2:g}")]
        state = {k: v.double().numpy() for k, v in load_file(str(saved[name] / "adapter.safetensors")).items()}
        assert set(state) == {"head.weight", "head.bias"}
        w = state["head.weight"] * scaler.scale_
        b = state["head.bias"] + state["head.weight"] @ scaler.mean_
        assert objective(w, b, l2) <= objective(model.coef_, model.intercept_, l2) + 1e-8, l2


def test_an_entry_without_layers_is_named_by_the_deepest_layer_it_reads(colour_store, tmp_path):
    """Such members were labelled layer "all", and the same adapter given the deepest layer by
    name trained a second time beside it, unnoticed."""
    from pipeline.training.members import expand

    reader = open_store(colour_store)  # layers embed, blocks.0, blocks.5
    members = expand(train_config(colour_store, tmp_path, [{"kind": "linear"}, {"kind": "inca"}]).adapters, reader.layers, 0)
    assert [(m.name, m.layer_label) for m in members] == [("linear@blocks.5 lr=0.001 wd=0.0001", "blocks.5"),
                                                          ("inca@blocks.5 lr=0.001 wd=0.0001", "blocks.5")]
    with pytest.raises(ConfigError, match=r"the same adapter is listed twice: \['linear@blocks.5 lr=0.001 wd=0.0001'\]"):
        expand(train_config(colour_store, tmp_path, [{"kind": "linear"}, {"kind": "linear", "layers": ["blocks.5"]}]).adapters, reader.layers, 0)


def test_members_have_stable_ids_distinct_where_names_collide(colour_store, tmp_path):
    """Two learning rates that print alike ("lr=0.001") make two members with one display
    name: each has its own id, which `train` gives its row, its ensembles and its logits. The
    id hashes the member's canonical JSON, so the same config gives the same ids in any run."""
    from pipeline.training.members import expand

    entry = {"kind": "linear", "layers": ["blocks.0"], "lr": [0.001, 0.0010000001], "weight_decay": 0.0}
    reader = open_store(colour_store)
    cfg = train_config(colour_store, tmp_path / "run", [entry], epochs=1, ensemble_top_k=2)
    members = expand(cfg.adapters, reader.layers, cfg.seed)
    assert [m.name for m in members] == ["linear@blocks.0 lr=0.001 wd=0"] * 2
    assert len({m.id for m in members}) == 2 and len({m.config_id for m in members}) == 2
    # Stable: pinned, and equal for a config built again with its hparams in another order.
    assert [m.id for m in members] == ["feccc8d57788", "cf71a59fca5f"]
    inca = {"kind": "inca", "layers": ["blocks.0"]}
    ids = [[m.id for m in expand(train_config(colour_store, tmp_path, [{**inca, "hparams": h}]).adapters, reader.layers, 0)]
           for h in ({"num_heads": 2, "num_queries": 1}, {"num_queries": 1, "num_heads": 2})]
    assert ids[0] == ids[1]
    # The seed enters the id, not the config_id (the benchmark averages a config over seeds).
    other_seed = expand(cfg.adapters, reader.layers, cfg.seed + 1)
    assert [m.config_id for m in other_seed] == [m.config_id for m in members]
    assert not {m.id for m in other_seed} & {m.id for m in members}

    result = run_train(cfg)
    rows = result["rows"]
    assert [r["member_id"] for r in rows] == [m.id for m in members] and rows[0]["adapter"] == rows[1]["adapter"]
    summary = result["summary"]
    assert summary["top1"]["member_id"] in {m.id for m in members}
    assert sorted(summary["ensemble"]["members"]) == sorted(m.id for m in members)
    assert summary["ensemble"]["adapters"] == [members[0].name] * 2
    assert list(np.load(tmp_path / "run" / "logits.npz")["member_ids"]) == [m.id for m in members]


def test_a_vqt_members_dropout_and_result_do_not_depend_on_its_mates(tmp_path, float64_training):
    """VQT's query dropout (p = 0.5, so masks matter) draws from each member's own stream:
    the member trained alone, fused with another seed, and in a job beside a linear probe
    (listed first, so built first) ends with the same weights and validation accuracy."""
    from safetensors.torch import load_file

    from pipeline.runners.extract import run_extract
    from pipeline.runners.train import _slug
    from tests.conftest import colour_folder, tiny_config

    cfg = tiny_config(tmp_path, colour_folder(tmp_path / "images", per_class=4), "backbone.layers=[0, 1, 2, 3, 4, 5]")
    run_extract(cfg)
    vqt = {"kind": "vqt", "hparams": {"num_queries": 1, "dropout": 0.5}, "lr": 0.01, "seeds": [0]}
    runs = {"alone": [vqt], "with_seed_1": [{**vqt, "seeds": [1, 0]}],
            "with_linear": [{"kind": "linear", "lr": 0.01, "seeds": [7]}, vqt]}
    weights, accs = {}, {}
    for name, adapters in runs.items():
        rows = run_train(train_config(cfg.store.path, tmp_path / name, adapters, epochs=2, save_top=3))["rows"]
        (row,) = [r for r in rows if r["kind"] == "vqt" and r["seed"] == 0]
        accs[name] = row["val_acc"]
        (d,) = [d for d in (tmp_path / name / "adapters").iterdir() if d.name[3:] == _slug(row["adapter"])]
        weights[name] = load_file(str(d / "adapter.safetensors"))
    assert accs["with_seed_1"] == accs["alone"] and accs["with_linear"] == accs["alone"]
    for name in ("with_seed_1", "with_linear"):
        assert weights[name].keys() == weights["alone"].keys()
        for k in weights["alone"]:
            torch.testing.assert_close(weights[name][k], weights["alone"][k], atol=1e-10, rtol=1e-9)


def test_a_test_split_that_trains_or_chooses_is_refused(tmp_path):
    """Test accuracy scored on training or validation samples used to be reported as is."""
    with pytest.raises(ConfigError) as e:
        train_config("s", tmp_path, [{"kind": "linear"}], val_split="val", test_split="val")
    assert e.value.problems == ["test_split: got 'val', the val_split; the test split must be one nothing was trained or chosen on"]
    with pytest.raises(ConfigError) as e:
        train_config("s", tmp_path, [{"kind": "linear"}], val_split="train", test_split="train")
    assert e.value.problems == ["val_split: got 'train', the train_split; leave it null to carve validation from it",
                                "test_split: got 'train', the train_split; the test split must be one nothing was trained or chosen on"]


def test_one_ranking_names_top1_orders_saves_and_makes_the_top_k(colour_store, tmp_path):
    """Members tie on validation accuracy here (all at 0.8 after one epoch at low learning rates);
    the ranking that names top-1, numbers the saved adapters and lists results.md is the one the
    top-k ensemble averages (ties broken by calibrated NLL). Before, the first three broke ties
    by position instead, and the "top 4" averaged members other than those saved as 01-04."""
    cfg = train_config(colour_store, tmp_path / "run", [{"kind": "linear", "layers": "all", "lr": [0.001, 0.0005]}],
                       epochs=1, save_top=4, ensemble_top_k=4)
    results = run_train(cfg)
    summary, rows = results["summary"], {r["member_id"]: r for r in results["rows"]}
    accs = sorted((r["val_acc"] for r in rows.values()), reverse=True)
    assert accs[0] == accs[1]  # a tie at the top: what this test is about
    top_k = summary["ensemble"]["members"]
    assert summary["ranking"][:4] == top_k and summary["top1"]["member_id"] == top_k[0]
    saved = sorted(p.name for p in (tmp_path / "run" / "adapters").iterdir())
    assert saved == [f"{n:02d}_{_slug(rows[i]['adapter'])}" for n, i in enumerate(top_k, 1)]
    table = (tmp_path / "run" / "results.md").read_text().splitlines()[2:2 + len(rows)]
    assert [line.split(" | ")[0].lstrip("| ") for line in table] == [rows[i]["adapter"] for i in summary["ranking"]]
    assert [rows[i]["val_acc"] for i in summary["ranking"]] == accs
    assert summary["ranking"] != [r["member_id"] for r in sorted(results["rows"], key=lambda r: -r["val_acc"])]  # ties by NLL, not position
    # The saved temperatures rebuild the top-k from logits.npz by hand (numpy softmax, mean, argmax).
    z = np.load(tmp_path / "run" / "logits.npz")
    t = np.array([summary["temperatures"][i] for i in z["member_ids"]])[:, None, None]
    p = np.exp(z["val_logits"] / t - (z["val_logits"] / t).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    members = [list(z["member_ids"]).index(i) for i in top_k]
    assert (p[members].mean(0).argmax(-1) == z["val_labels"]).mean() == summary["ensemble"]["val_acc"]
    # Accuracies are k/n in float64, exactly numpy's (0.8 here; float32's rounding was 0.800000011920929).
    for m, member_id in enumerate(z["member_ids"]):
        assert rows[member_id]["val_acc"] == (z["val_logits"][m].argmax(-1) == z["val_labels"]).mean()


def test_a_diverged_member_is_flagged_and_kept_out_of_the_ranking_saves_and_ensembles(colour_store, tmp_path, caplog):
    """lr 1 with weight decay 1e20 makes a probe's weights non-finite in its first steps. Before, its NaN
    logits read as class 0, and it joined the top-k average (all NaN: one class), exit 0."""
    healthy = {"kind": "linear", "layers": ["blocks.0"], "lr": [0.03, 0.01]}
    blown = {"kind": "linear", "layers": ["blocks.5"], "lr": 1.0, "weight_decay": 1.0e20}
    both = run_train(train_config(colour_store, tmp_path / "both", [healthy, blown], epochs=3, save_top=3))
    alone = run_train(train_config(colour_store, tmp_path / "alone", [healthy], epochs=3, save_top=3))
    z = np.load(tmp_path / "both" / "logits.npz")
    finite = np.isfinite(z["val_logits"]).all(axis=(1, 2))
    assert finite.tolist() == [not r["diverged"] for r in both["rows"]] == [True, True, False]
    for m, r in enumerate(both["rows"]):  # numpy: a sample with a non-finite logit is never right
        right = (z["val_logits"][m].argmax(-1) == z["val_labels"]) & np.isfinite(z["val_logits"][m]).all(-1)
        assert r["val_acc"] == pytest.approx(right.mean())
    bad = both["rows"][2]
    assert any(r.levelname == "WARNING" and bad["adapter"] in r.getMessage() for r in caplog.records)
    # The healthy members' outputs are what they are without the blown one beside them.
    for key in ("top1", "ensemble", "greedy"):
        assert both["summary"][key] == alone["summary"][key], key
    assert both["summary"]["ranking"] == alone["summary"]["ranking"] + [bad["member_id"]]
    assert sorted(p.name for p in (tmp_path / "both" / "adapters").iterdir()) == sorted(p.name for p in (tmp_path / "alone" / "adapters").iterdir())


def test_early_stopping_stops_each_member_on_its_own(colour_store, tmp_path, float64_training):
    """patience 1: a member stops after its first epoch without improving, whatever its fused
    mates do. Before, a group trained on while any member improved, so a member's training (and
    a sweep trial's result) depended on the trials it shared a job with."""
    entry = {"kind": "linear", "layers": ["embed"]}
    fused = run_train(train_config(colour_store, tmp_path / "fused", [{**entry, "lr": [0.0003, 0.001]}], epochs=6,
                                   early_stopping_patience=1))
    history: dict[str, list[float]] = {}
    for line in (tmp_path / "fused" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_acc" in row:
            history.setdefault(row["member_id"], []).append(row["val_acc"])

    def stop_epoch(accs):  # by hand: the first epoch that did not beat the best before it
        return next((e for e in range(1, len(accs)) if accs[e] <= max(accs[:e])), None) + 1

    stops = {r["member_id"]: r["stopped_early_at"] for r in fused["rows"]}
    assert sorted(stops.values()) == [2, 3]  # the mates stop at different epochs: what this test is about
    for member_id, accs in history.items():
        assert len(accs) == stops[member_id] == stop_epoch(accs)  # validated up to its stop, not after
    for lr in (0.0003, 0.001):
        alone = run_train(train_config(colour_store, tmp_path / f"alone{lr}", [{**entry, "lr": lr}], epochs=6,
                                       early_stopping_patience=1))["rows"][0]
        mine = next(r for r in fused["rows"] if r["member_id"] == alone["member_id"])
        assert (mine["stopped_early_at"], mine["val_acc"]) == (alone["stopped_early_at"], alone["val_acc"])


def test_when_every_member_diverges_nothing_is_named_saved_or_ensembled(colour_store, tmp_path):
    blown = {"kind": "linear", "layers": ["blocks.5"], "lr": 1.0, "weight_decay": [1.0e20, 1.0e21]}
    result = run_train(train_config(colour_store, tmp_path / "run", [blown], epochs=1, save_top=2))
    assert all(r["diverged"] for r in result["rows"])
    summary = result["summary"]
    assert summary["top1"] is None and summary["saved"] == [] and summary["ensemble"]["members"] == []
    assert "**Every member diverged**" in (tmp_path / "run" / "results.md").read_text()


def test_a_member_whose_patience_ends_at_a_rung_still_reports_there(colour_store, tmp_path, monkeypatch):
    """Early stopping (patience 1) and pruning (a rung at epoch 2): members that stop at epoch
    2 by their own patience still report their rung value and compete there; before, they
    were split off first and missing from the rung, and a sweep's later jobs were ranked
    against fewer values."""
    from pipeline.runners import train

    rule, ranked_against = train.promoted, []
    monkeypatch.setattr(train, "promoted", lambda value, competing, factor: ranked_against.append(sorted(competing)) or rule(value, competing, factor))
    cfg = train_config(colour_store, tmp_path / "run", [{"kind": "linear", "layers": ["embed"], "lr": [0.00001, 0.0001, 0.001, 0.03]}],
                       epochs=4, early_stopping_patience=1, pruning={"min_epochs": 2, "reduction_factor": 2})
    rows = run_train(cfg)["rows"]
    assert any(r["stopped_early_at"] == 2 for r in rows)  # what this test is about
    assert all("2" in r["rung_acc"] for r in rows)  # every member trained through epoch 2 reported there
    # ... and each was ranked against all four values at the rung, its own included.
    assert ranked_against and all(c == sorted(r["rung_acc"]["2"] for r in rows) for c in ranked_against)


def test_a_warm_up_as_long_as_the_run_is_said(colour_store, tmp_path, caplog):
    """warmup_epochs >= epochs: the learning rate rises the whole run and never decays."""
    from pipeline.runners.train import plan_training

    entry = [{"kind": "linear", "layers": ["blocks.5"], "lr": 0.01}]
    with caplog.at_level("WARNING"):
        plan_training(train_config(colour_store, tmp_path / "a", entry, epochs=2, warmup_epochs=0.5))
    assert "warm-up" not in caplog.text
    with caplog.at_level("WARNING"):
        plan_training(train_config(colour_store, tmp_path / "b", entry, epochs=2, warmup_epochs=2))
    assert "warmup_epochs=2 covers all 2 epochs: the learning rate rises the whole run and never decays" in caplog.text
