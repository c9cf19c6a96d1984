"""The `bench` command on a tiny ViT: every method reported, chosen on validation, resumable."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from pipeline.config import BenchConfig, ConfigError, build, load_config
from tests.conftest import write_image_folder

METHODS = [
    {"kind": "linear", "layers": "all", "lr": [1e-3, 1e-2]},
    {"kind": "linear", "solver": "lbfgs", "layers": ["blocks.4", "blocks.5"], "weight_decay": [0.1, 0.001]},
    {"kind": "inca", "layers": "all", "hparams": {"num_queries": 1, "num_heads": 2, "dim": 16}, "lr": [1e-3, 3e-3]},
    {"kind": "losa", "hparams": {"rank": 4}},
    {"kind": "vqt", "hparams": {"num_queries": 1}},
]


def _bench_yaml(tmp, sklearn_C=(0.1, 1.0)) -> str:
    extract = {
        "backbone": {"name": "test_vit", "weights": "none", "layers": [0, 1, 2, 3, 4, 5]},
        "data": {"kind": "image_folder", "root": str(tmp / "images"), "splits": ["train", "val"]},
        "store": {"path": str(tmp / "store.zarr"), "samples_per_chunk": 4, "chunks_per_shard": 2},
        "preprocess": {"image_size": 64},
        "runtime": {"batch_size": 8, "num_workers": 0},
    }
    (tmp / "extract.yaml").write_text(yaml.safe_dump(extract))
    from pipeline.benchmarking.report import HEADLINE_END, HEADLINE_START, standalone_markers

    (tmp / "README.md").write_text(f"# tiny\n\nbefore\n{HEADLINE_START}\nstale\n{HEADLINE_END}\nafter\n")
    # An earlier report with a section from a stand-alone script, which the bench must keep.
    (tmp / "report").mkdir(exist_ok=True)
    (tmp / "report" / "BENCHMARKS.md").write_text("# stale bench\n\n" + "\n".join(
        [standalone_markers("benchmarks/bench_x.py")[0], "## X kept", standalone_markers("benchmarks/bench_x.py")[1]]) + "\n")
    bench = {
        "output": str(tmp / "out"), "report": str(tmp / "report" / "BENCHMARKS.md"), "readme": str(tmp / "README.md"),
        "seeds": [0, 1], "epochs": 2, "batch_size": 8,
        "cases": [{"name": "tiny", "extract": str(tmp / "extract.yaml"), "test_split": "val", "methods": METHODS,
                   "sklearn": {"C": list(sklearn_C), "per_layer": True},
                   "finetune": {"image_size": 32, "epochs": 2, "time_budget_s": 0, "lr": [1e-4, 1e-3], "batch_size": 8, "seeds": [0]},
                   "store_variants": [["store.dtype=int8"], ["store.tokens=mean"]],
                   "views": {"counts": [1, 2], "augment": ["augment.scale=[0.5,1.0]"],
                             "methods": [{"kind": "linear", "layers": ["blocks.5"], "solver": "lbfgs", "weight_decay": [0.01, 0.1]},
                                         {"kind": "inca", "layers": ["blocks.5"], "hparams": {"dim": 16}, "lr": [0.001]}]}}],
        "speed": {"case": "tiny", "images": 8, "rounds": 1, "fused": 2, "sweep_configs": 2},
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return str(path)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from pipeline.runners.bench import run_bench

    tmp = tmp_path_factory.mktemp("bench")
    write_image_folder(tmp / "images", per_class=8)
    path = _bench_yaml(tmp)
    result = run_bench(load_config(BenchConfig, path), path)
    return tmp, path, result


@pytest.mark.slow
def test_report_has_every_method_table_and_plot(bench):
    tmp, _, result = bench
    text = (tmp / "report" / "BENCHMARKS.md").read_text()
    for method in ("linear probe (AdamW), last layer (blocks.5)", "linear probe (AdamW), best layer",
                   "linear probe (L-BFGS, exact), last layer (blocks.5)", "InCA (dim-16 bottleneck), top-1 over layers",
                   "InCA (dim-16 bottleneck), top-k ensemble (calibrated)", "InCA (dim-16 bottleneck), greedy ensemble (calibrated)",
                   "greedy ensemble over every method's grid", "LoSA", "VQT", "sklearn LogisticRegression", "full fine-tuning (paragon)"):
        assert f"| {method}" in text, method
    for section in ("## Protocol", "### inca_d16 per layer", "### Storage options", "## Speed and scale", " cores ("):
        assert section in text
    # Held in RAM against streaming and the floor, for 1 and for N fused adapters, side by side.
    assert [h["adapters"] for h in result["speed"]["held"]] == [1, 2]
    assert all(len(h["seconds"][k]) == 1 for h in result["speed"]["held"] for k in ("held", "streamed", "floor"))
    assert "1 InCA adapter(s) on `blocks.5`, one epoch on cpu: store held in memory / streamed / floor" in text
    for plot in ("accuracy_vs_params.png", "accuracy_per_layer.png", "time_vs_accuracy.png", "accuracy_vs_training_time.png"):
        assert (tmp / "report" / "benchmark_plots" / plot).read_bytes()[:4] == b"\x89PNG"
    rows = {r["method"]: r for r in result["cases"][0]["rows"]}
    assert all(r["seeds"] == 2 for m, r in rows.items() if not m.startswith("full fine-tuning"))
    solo = [r for r in rows.values() if r["kind"] in ("linear", "inca", "losa", "vqt")]
    assert all(r["wall_s"] > 0 and r["peak_mb"] is not None for r in solo)
    assert rows["full fine-tuning (paragon)"]["pct_backbone"] == 100.0
    paragon = rows["full fine-tuning (paragon)"]["paragon"]
    assert [x["lr"] for x in paragon["lr_search"]] == [1e-4, 1e-3] and paragon["epochs_run"] == [1]  # a budget of 0 s: one epoch
    assert "the other seeds ran at it" in text and "vs full fine-tuning: **" in text and "9.2x" in text
    # The targets, each with its measured values; sklearn beside every per-layer row of the probes.
    for target in ("our linear probe (exact), last layer >= sklearn - 0.3", "in every per-layer row",
                   "best cached adapter chosen on validation", "greedy calibrated ensemble >= best single adapter",
                   "LoSA >= last-layer linear probe (exact)", "VQT >= best-layer linear probe (exact)"):
        assert target in text, target
    assert "| sklearn test (C) | difference |" in text
    assert "lbfgs to tol 1e-08 (converged in" in rows["sklearn LogisticRegression, last layer (blocks.5)"]["config"]
    # An ensemble's time is its grid's run end to end (a solved grid's too), not its epochs' training alone.
    assert all(r["wall_s"] > 0 and r["time_note"].endswith("end to end") for r in rows.values() if r["kind"] == "ensemble")
    # A stand-alone script's section survives the rewrite, after the bench's own text.
    assert "# stale bench" not in text and text.rstrip().endswith("## X kept\n<!-- end of benchmarks/bench_x.py -->")
    # The README's headline block is rewritten from the same results, the rest of the file kept.
    readme = (tmp / "README.md").read_text()
    assert readme.startswith("# tiny\n\nbefore\n") and readme.endswith("after\n") and "stale" not in readme
    assert "**tiny** (test_vit, 64x64 px)" in readme and "| our linear probe (exact), last layer >= sklearn - 0.3 |" in readme


@pytest.mark.slow
def test_choices_are_made_on_mean_validation_never_test(bench):
    tmp, _, result = bench
    grids = [json.loads((tmp / "out" / "units" / f"tiny.inca_d16.seed{s}.json").read_text())["result"] for s in (0, 1)]
    # A configuration's members across seeds share its config_id (their member ids differ: the seed).
    mean_val = {}
    for grid in grids:
        for row in grid["rows"]:
            mean_val.setdefault(row["config_id"], []).append(row["val_acc"])
    assert all(len(v) == 2 for v in mean_val.values())
    best_val = max(statistics.fmean(v) for v in mean_val.values())
    top1 = next(r for r in result["cases"][0]["rows"] if r["method"].startswith("InCA (dim-16 bottleneck), top-1"))
    assert statistics.fmean(mean_val[top1["config_id"]]) == best_val
    chosen = [r for g in grids for r in g["rows"] if r["config_id"] == top1["config_id"]]
    assert top1["test_acc"] == pytest.approx(statistics.fmean(r["test_acc"] for r in chosen), abs=1e-12)  # rounded to 12 places
    assert {r["adapter"] for r in chosen} == {top1["config"]}  # the report shows its name
    # The solo rerun (a fresh process, seed 0) trained exactly the chosen member, alone. That
    # it then equals the fused member is proved in float64 by test_train; here, in float32 on
    # whatever CPU runs the suite, Adam may amplify rounding differently in the two runs.
    solo = json.loads((tmp / "out" / "units" / f"tiny.inca_d16.solo.{top1['config_id']}.json").read_text())
    assert solo["result"]["result"]["config_id"] == top1["config_id"]
    assert solo["result"]["result"]["fused_with"] == 1 and solo["key"]["settings"]["seed"] == 0
    assert top1["solo_test_acc"] == solo["result"]["result"]["test_acc"]


@pytest.mark.slow
def test_store_variants_price_disk_and_accuracy(bench):
    _, _, result = bench
    options = {o["option"]: o for o in result["cases"][0]["store_variants"]}
    assert set(options) == {"as extracted", "dtype=int8", "tokens=mean"}
    assert options["dtype=int8"]["kb_raw"] < options["as extracted"]["kb_raw"]
    assert options["tokens=mean"]["layer_shapes"]["blocks.5"] == [1, 64]  # the mean of the patch tokens
    assert all(set(o["accuracy"]) == {"linear", "inca"} for o in options.values())


@pytest.mark.slow
def test_views_study_prices_accuracy_disk_and_time_against_k(bench):
    tmp, _, result = bench
    k1, k2 = result["cases"][0]["views"]
    assert (k1["views"], k2["views"]) == (1, 2) and ".views2." in k2["store"]
    # train has 24 images and val 24: two views of train are 3/2 of the clean store's layers on disk.
    assert k2["kb_on_disk"] > 1.3 * k1["kb_on_disk"]
    assert k2["extract_s"] is not None and k2["images_computed"] == 24 * 2 + 24
    assert set(k2["methods"]) == {"linear_lbfgs", "linear_lbfgs greedy", "inca_d16"} and k2["best"] in ("linear_lbfgs", "inca_d16")
    assert all(m["seeds"] == 2 and m["test_acc"] is not None for r in (k1, k2) for m in r["methods"].values())
    report = (tmp / "out" / "BENCHMARKS.md").read_text()
    assert "### Augmented views per training image (tiny)" in report and "Target (K=2 adds >= 1 point over K=1" in report
    # The two sides of the target may be different methods: the line names each.
    top, base = k2["methods"][k2["best"]]["test_acc"], k1["methods"][k1["best"]]["test_acc"]
    assert f"{100 * top:.2f} ({k2['best']}) vs {100 * base:.2f} ({k1['best']})" in report


@pytest.mark.slow
def test_rerun_reuses_every_unit_and_a_changed_setting_redoes_only_its_units(bench, monkeypatch):
    from pipeline.benchmarking import methods
    from pipeline.runners import bench as bench_module

    tmp, path, first = bench

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished unit was recomputed")

    monkeypatch.setattr(methods, "train_grid", must_not_train)
    monkeypatch.setattr(bench_module, "run_measured", must_not_train)
    again = bench_module.run_bench(load_config(BenchConfig, path), path)
    assert again["units_computed"] == 0 and again["units_reused"] == first["units_computed"] + first["units_reused"]
    assert again["cases"] == first["cases"]

    # Another sklearn grid: only the sklearn units (per seed + its solo timing) run again.
    monkeypatch.setattr(bench_module, "run_measured", lambda fn, *args: {"result": fn(*args), "wall_s": 1.0, "peak_mb": 0.0, "gpu_peak_mb": None})
    path = _bench_yaml(tmp, sklearn_C=(0.5,))
    changed = bench_module.run_bench(load_config(BenchConfig, path), path)
    assert changed["units_computed"] == 3 + 7 * 2  # 2 seeds + the solo fit, and 7 layers x 2 seeds of the per-layer reference
    assert "C 0.5 chosen on mean validation from [0.5]" in (tmp / "out" / "BENCHMARKS.md").read_text()


def test_bench_config_lists_every_problem():
    case = {"name": "a b", "extract": "e.yaml", "test_split": "val", "store_variants": [["dtype int8"]],
            "methods": [{"kind": "linear"}, {"kind": "linear", "lr": 0.1}]}
    with pytest.raises(ConfigError) as e:
        build(BenchConfig, {"output": "x", "cases": [case]})
    for fragment in ("cases[0].name: got 'a b'", "'linear' is listed twice", "cases[0].store_variants[0]: got ['dtype int8']"):
        assert fragment in str(e.value), fragment
    with pytest.raises(ConfigError) as e:
        build(BenchConfig, {"output": "x", "seeds": [], "epochs": 0, "speed": {"case": "nope"},
                            "cases": [{**case, "name": "ok", "store_variants": [], "methods": [{"kind": "linear"}]}]})
    for fragment in ("seeds: got []", "epochs: got 0", "speed.case: got 'nope', expected one of the cases ['ok']"):
        assert fragment in str(e.value), fragment


def allocate_mb(mb: int) -> float:
    import numpy as np

    return float(np.ones(mb * 2**20 // 8).sum())


def test_measured_peak_is_the_childs_own_not_its_parents():
    """ru_maxrss survives exec, so a child spawned by a big parent would report the parent's
    peak; the measured peak must be what the function itself allocated."""
    import numpy as np

    from pipeline.benchmarking.measured import run_measured

    held = np.ones(1200 * 2**20 // 8)  # the parent holds 1.2 GB, more than the child will
    measured = run_measured(allocate_mb, 300)
    assert measured["result"] == 300 * 2**20 // 8
    # At least the 300 MiB the child touched (less a little slack for pages the baseline held
    # and the child freed); well under the parent's 1.2 GB. No bound tighter than these two
    # facts: allocator overheads vary with the machine.
    assert 280 < measured["peak_mb"] < 1200, measured["peak_mb"]
    assert held[0] == 1.0


def test_pooled_greedy_refuses_logits_of_other_members(tmp_path):
    """A grid's logits file rewritten by another run must not be pooled with the unit's rows."""
    import numpy as np

    from cache import StoreError
    from pipeline.benchmarking.methods import pooled_greedy

    labels = np.array([0, 1, 0, 1])
    logits = np.random.default_rng(0).normal(size=(2, 4, 2)).astype(np.float32)
    path = tmp_path / "logits.npz"
    np.savez(path, member_ids=np.array(["aaa", "bbb"]), val_logits=logits, val_labels=labels, test_logits=logits, test_labels=labels)
    rows = [{"member_id": "aaa", "adapter": "a"}, {"member_id": "bbb", "adapter": "b"}]
    ok = pooled_greedy([[{"logits": str(path), "rows": rows}]], "pooled", 1)
    assert ok["seeds"] == 1 and ok["val_acc"] is not None
    with pytest.raises(StoreError, match="holds other members than its saved unit"):
        pooled_greedy([[{"logits": str(path), "rows": rows[::-1]}]], "pooled", 1)


def test_a_unit_is_recomputed_when_its_settings_or_the_training_code_change(tmp_path, monkeypatch):
    from pipeline.benchmarking import units as units_module

    calls = []
    units = units_module.Units(tmp_path)
    compute = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert units.get("grid", {"lr": 1}, compute) == 1
    assert units.get("grid", {"lr": 1}, compute) == 1  # reused: nothing computed
    assert units.get("grid", {"lr": 2}, compute) == 2
    monkeypatch.setattr(units_module, "CODE_VERSION", "another")
    assert units.get("grid", {"lr": 2}, compute) == 3
    assert (units.reused, units.computed) == (1, 3)
    # Another machine (here: another torch thread count) times and measures again: before, its
    # report printed this machine's header over the first machine's timings.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert units_module.Units(tmp_path).get("grid", {"lr": 2}, compute) == 4
    finally:
        torch.set_num_threads(threads)


def test_a_standalone_section_is_appended_then_rewritten_in_place(tmp_path):
    from pipeline.benchmarking.report import replace_block, standalone_markers, with_standalone_sections

    path, markers = tmp_path / "BENCHMARKS.md", standalone_markers("benchmarks/bench_y.py")
    path.write_text("# Benchmarks\n\nbody\n")
    replace_block(path, *markers, "## Y\nfirst", append=True)
    replace_block(path, *markers, "## Y\nsecond", append=True)
    assert path.read_text() == f"# Benchmarks\n\nbody\n\n{markers[0]}\n## Y\nsecond\n{markers[1]}\n"
    # A new bench report keeps it; a file with no such section adds nothing.
    assert with_standalone_sections("# New\n", path.read_text()) == f"# New\n\n{markers[0]}\n## Y\nsecond\n{markers[1]}\n"
    assert with_standalone_sections("# New\n", "# Old\n") == "# New\n"
    with pytest.raises(ValueError, match="no block to rewrite"):
        replace_block(tmp_path / "README.md", *markers, "x")


def test_the_code_version_covers_every_module_that_computes_a_unit():
    """The oracle is Python's own import system: every project module that importing the
    computing modules loads, and the training runner they call (imported lazily by speed.py
    and at the top by methods.py), must be hashed into CODE_VERSION; reporting code must not."""
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.benchmarking import units
    from pipeline.code_version import code_files

    root = Path(__file__).resolve().parents[1]
    script = ("import sys, importlib\n"
              f"for m in {units.COMPUTING_MODULES!r}: importlib.import_module(m)\n"
              "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] in ('pipeline', 'cache')))")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    hashed = set(code_files(units.COMPUTING_MODULES))
    assert {Path(f).resolve() for f in loaded} <= hashed
    assert {root / "pipeline/runners/train.py", root / "pipeline/config/train_config.py", root / "pipeline/training/splits.py"} <= hashed
    assert not {root / "pipeline/benchmarking/report.py", root / "pipeline/cli.py", root / "pipeline/runners/bench.py"} & hashed


def test_a_tie_on_validation_never_lets_the_config_order_decide_a_verdict():
    """Two adapters tie on mean validation (DINOv2's InCA d64 and full width did): the verdicts
    compare every tied choice, whatever order the config lists them in (before, the first
    listed decided "greedy >= best single": yes one way round, no the other)."""
    from pipeline.benchmarking.report import targets

    def row(method, kind, val, test):
        return {"method": method, "kind": kind, "val_acc": val, "test_acc": test}

    a, b = row("InCA d64", "inca", 0.8533, 0.8300), row("InCA full", "inca", 0.8533, 0.8480)
    others = [row("sklearn LogisticRegression, last layer", "sklearn", 0.84, 0.8400),
              row("greedy ensemble over every method's grid (calibrated)", "ensemble", 0.88, 0.8340)]
    for order in ([a, b], [b, a]):
        verdicts = {t["target"].split(" (")[0]: t for t in targets({"rows": order + others, "per_layer": {}})}
        greedy, sk = verdicts["greedy calibrated ensemble >= best single adapter"], verdicts["best cached adapter chosen on validation"]
        assert not greedy["met"] and "83.40 vs best single 84.80" in greedy["measured"] and "tied on validation" in greedy["measured"]
        assert not sk["met"] and sk["measured"].startswith("83.00 vs sklearn 84.00")


def test_the_speed_baselines_run_where_extraction_runs(tmp_path, monkeypatch):
    """The bare forward and the training with the backbone in the loop are compared with
    extraction and cached training, which run on extraction's device (a GPU where there is
    one): they must run there too. The meta device stands in for the GPU here: a model left
    on the CPU stays there, and an adapter left there fails on meta tokens."""
    import torch

    import pipeline.runners.extract as extract
    from cache import open_store
    from pipeline.benchmarking import speed
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, write_image_folder(tmp_path / "images", per_class=2))
    extract.run_extract(cfg)
    layer = list(open_store(cfg.store.path).layers)[-1]
    monkeypatch.setattr(extract, "resolve_device", lambda name, key: torch.device("meta"))
    plan = extract.plan_extraction(cfg)
    assert speed.bare_forward(plan) > 0
    assert {p.device.type for p in plan.backbone.model.parameters()} == {"meta"}
    _, samples = speed.online_epoch(cfg, cfg.store.path, layer, batch_size=4)
    assert samples == 6  # the first split: 3 classes x 2 images, every one trained on


def grid_row(config: str, val: float, test: float = 0.5, **extra) -> dict:
    return {"config_id": config, "adapter": config, "kind": "linear", "layer": "blocks.0", "params": 1, "pct_backbone": 0.0,
            "val_acc": val, "test_acc": test, **extra}


def test_an_exact_tie_in_correct_counts_is_a_tie_whatever_the_floats_say():
    """(80, 80, 87) and (80, 82, 85) of 100 are both 247 of 300 correct, but their float means
    differ by an ulp: the first won, though ties go to the greater name."""
    from pipeline.benchmarking.methods import choose

    a, b = (80, 80, 87), (80, 82, 85)
    assert sum(a) == sum(b) and statistics.fmean(x / 100 for x in a) != statistics.fmean(x / 100 for x in b)
    grids = [{"rows": [grid_row("aaa", a[s] / 100), grid_row("zzz", b[s] / 100)]} for s in range(3)]
    chosen = choose(grids, "best")
    assert chosen["config_id"] == "zzz" and chosen["val_acc"] == pytest.approx(247 / 300, abs=1e-12)


def test_a_configuration_that_diverged_in_any_seed_is_never_chosen():
    from pipeline.benchmarking.methods import choose

    grids = [{"rows": [grid_row("good", 0.80), grid_row("nan", 0.95, diverged=s == 1)]} for s in range(3)]
    assert choose(grids, "best")["config_id"] == "good"


def test_a_difference_printed_beside_a_verdict_never_reads_as_the_other_verdict():
    """-0.3033 points against a margin of 0.3 is not met; printed as -0.30 it read as met."""
    from pipeline.benchmarking.report import targets

    rows = [{"method": "linear probe (L-BFGS, exact), last layer (blocks.1)", "kind": "linear", "val_acc": 0.7, "test_acc": 0.696967},
            {"method": "sklearn LogisticRegression, last layer", "kind": "sklearn", "val_acc": 0.7, "test_acc": 0.7}]
    (verdict,) = [t for t in targets({"rows": rows, "per_layer": {}}) if t["target"].startswith("our linear probe (exact), last")]
    assert not verdict["met"] and "(-0.303)" in verdict["measured"]


def test_seeds_that_agree_show_a_zero_spread_and_one_seed_shows_none():
    from pipeline.benchmarking.methods import spread
    from pipeline.benchmarking.report import _pct

    agree, one = spread([{"val_acc": 0.5, "test_acc": 0.75}] * 3), spread([{"val_acc": 0.5, "test_acc": 0.75}])
    assert _pct(agree["test_acc"], agree["test_acc_sd"]) == "75.00 ± 0.00"
    assert _pct(one["test_acc"], one["test_acc_sd"]) == "75.00"


@pytest.mark.parametrize("bad", [{"store_variants": [["store.dtyp=int8"]]}, {"views": {"counts": [1, 2], "augment": ["augment.scal=[0.5,1.0]"],
                                                                                         "methods": [{"kind": "linear"}]}},
                                 "readme"])
def test_the_bench_refuses_what_would_fail_late_before_any_work(tmp_path, monkeypatch, bad):
    """A store_variants typo was found after extraction and the grids; a README without the
    headline markers at the very end, every result computed."""
    import pipeline.runners.bench as bench_module

    write_image_folder(tmp_path / "images", per_class=2)
    data = yaml.safe_load(Path(_bench_yaml(tmp_path)).read_text())
    data["cases"][0].pop("views")
    data["cases"][0]["store_variants"] = []
    if bad == "readme":
        (tmp_path / "README.md").write_text("# no markers\n")
    else:
        data["cases"][0].update(bad)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setattr(bench_module, "_print_cost", lambda *a: pytest.fail("work began"))
    with pytest.raises(ConfigError, match=r"unknown key; did you mean|has no headline block to rewrite"):
        bench_module.run_bench(load_config(BenchConfig, str(tmp_path / "bench.yaml")), str(tmp_path / "bench.yaml"))


def test_bench_overwrite_replaces_a_store_made_from_other_images(tmp_path, capsys):
    """Images copied again (new mtimes) make the case's store differ from its config: the bench
    refused and advised --overwrite, an option it did not have."""
    import os

    from pipeline.cli import main

    write_image_folder(tmp_path / "images", per_class=3)
    data = yaml.safe_load(Path(_bench_yaml(tmp_path)).read_text())
    case = data["cases"][0]
    for key in ("views", "finetune", "store_variants", "sklearn"):
        case.pop(key)
    case["methods"] = [{"kind": "linear", "solver": "lbfgs", "layers": ["blocks.5"], "weight_decay": [0.1]}]
    data.update(seeds=[0], speed=None, readme=None, report=None)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(data))
    bench = str(tmp_path / "bench.yaml")
    assert main(["bench", bench, "-q"]) == 0
    first_run = json.loads((tmp_path / "out" / "bench_results.json").read_text())
    first = first_run["cases"][0]["rows"]
    assert first and all(r["test_acc_all"] for r in first) and first_run["units_computed"] > 0
    from cache import open_store

    made = open_store(str(tmp_path / "store.zarr")).creation

    image = next((tmp_path / "images" / "train").rglob("*.jpg"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert main(["bench", bench, "-q"]) == 2
    err = capsys.readouterr().err
    assert "made differently" in err and "mtime_ns" in err and "--overwrite" in err

    assert main(["bench", bench, "-q", "--overwrite"]) == 0
    store = open_store(str(tmp_path / "store.zarr"))
    assert store.is_complete() and store.creation != made  # extracted again
    again_run = json.loads((tmp_path / "out" / "bench_results.json").read_text())
    # Every unit is keyed by the new store: computed again, as on a first run.
    assert (again_run["units_computed"], again_run["units_reused"]) == (first_run["units_computed"], first_run["units_reused"])
    again = again_run["cases"][0]["rows"]
    # Same pixels, so the same features and accuracies; the units were keyed by the new store.
    assert [r["test_acc_all"] for r in again] == [r["test_acc_all"] for r in first]
