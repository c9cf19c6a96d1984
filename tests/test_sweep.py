"""sweep: config errors, deterministic trials, dask == in-process, reruns skip, a killed worker."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, SweepConfig, TrainConfig, build, load_config
from pipeline.dask_cluster import local_cluster
from pipeline.runners.extract import run_extract
from pipeline.runners.sweep import run_sweep
from pipeline.runners.train import run_train
from pipeline.sweeping.jobs import plan_jobs, trial_member
from pipeline.sweeping.space import make_trials, new_trial
from tests.conftest import REPO, colour_folder, tiny_config

pytestmark = pytest.mark.dask

# 8 linear trials in 2 fused groups of 4 (one per layer) + 4 InCA trials in 2 groups of 2.
GRID = [
    {"kind": "linear", "layer": ["blocks.0", "blocks.5"], "lr": [0.003, 0.03], "weight_decay": [0.0, 1.0e-4]},
    {"kind": "inca", "layer": ["blocks.5"], "lr": [0.003, 0.01], "hparams": {"num_heads": [2, 4]}},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("colour")
    cfg = tiny_config(tmp, colour_folder(tmp / "images"), "backbone.layers=[0, -1]", "store.samples_per_chunk=8")
    run_extract(cfg)
    return cfg.store.path  # layers: embed, blocks.0, blocks.5


def sweep_data(store, out, space=GRID, **extra) -> dict:
    return {"store": store, "output": str(out), "val_fraction": 0.25, "test_split": "val", "epochs": 2,
            "batch_size": 8, "warmup_epochs": 0.5, "trials_per_job": 4, "space": space, **extra}


def read_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def test_config_errors_name_keys():
    with pytest.raises(ConfigError) as e:
        build(SweepConfig, sweep_data("s", "o", search="random", num_trials=3, space=[
            {"kind": "lineer"},
            {"kind": "linear", "lr": {"low": 0.1, "high": 0.01}, "layers": [["a"]]},
            {"kind": "inca", "hparams": {"nheads": [2]}, "weight_decay": {"low": 0, "high": 1, "log": True}},
            {"kind": "losa", "hparams": {"rank": [0, 4]}, "lr": {"low": 1e-4, "hi": 1e-2}},
        ]))
    msg = str(e.value)
    for expected in [
        "space[0].kind: unknown adapter kind 'lineer' (did you mean 'linear'?)",
        "space[1].lr: got low=0.1, high=0.01, expected low < high",
        "space[1].layers: adapter 'linear' has no `layers` hyperparameter; use `layer`",
        "space[2].hparams.nheads: adapter 'inca' has no hyperparameter 'nheads'",
        "space[2].weight_decay: got low=0 with log: true, expected low > 0",
        "space[3].hparams.rank: adapter 'losa': hyperparameter 'rank' = 0 is invalid",
        "space[3].lr: got {'low': 0.0001, 'hi': 0.01}, expected a range {low, high, log}; unknown ['hi']; missing ['high']",
    ]:
        assert expected in msg, f"{expected!r} missing from:\n{msg}"
    # Whole-config checks (they run once every entry is valid).
    with pytest.raises(ConfigError, match=r"space\[0\].lr: got range .* search: grid needs a list"):
        build(SweepConfig, sweep_data("s", "o", space=[{"kind": "linear", "lr": {"low": 1e-3, "high": 1e-2}}]))
    with pytest.raises(ConfigError, match="num_trials: got None, expected an integer > 0 for search: random"):
        build(SweepConfig, sweep_data("s", "o", search="random"))


def test_layers_not_in_the_store_are_all_named_at_once(store, tmp_path):
    """As `train` names them: every entry's unknown layers in one ConfigError, before any job."""
    cfg = build(SweepConfig, sweep_data(store, tmp_path / "out", space=[
        {"kind": "linear", "layer": ["blocks.9", "blocks.0"]},
        {"kind": "losa", "layers": [["blocks.0", "blocks.7"]]},
    ]))
    with pytest.raises(ConfigError) as e:
        run_sweep(cfg, workers=0)
    has = "; it has ['embed', 'blocks.0', 'blocks.5']"
    assert e.value.problems == [f"space[0].layer: ['blocks.9'] are not in the store{has}",
                                f"space[1].layers: ['blocks.7'] are not in the store{has}"]
    assert not (tmp_path / "out" / "trials.jsonl").exists()


def test_trials_are_deterministic_and_ids_stable():
    grid = make_trials(build(SweepConfig, sweep_data("s", "o")), {})
    assert len(grid) == 12 and len({t.id for t in grid}) == 12
    # Expansion order: entry, layer, hparams, lr, weight decay, seed.
    assert [(t.hparams["layer"], t.lr, t.weight_decay) for t in grid[:3]] == [("blocks.0", 0.003, 0.0), ("blocks.0", 0.003, 1e-4), ("blocks.0", 0.03, 0.0)]
    space = [{"kind": "inca", "layer": ["blocks.0", "blocks.5"], "lr": {"low": 1e-4, "high": 1e-1, "log": True},
              "hparams": {"num_heads": [2, 4], "num_queries": {"low": 1, "high": 4}}, "seeds": [0, 1]}]

    def random(**kw):
        return make_trials(build(SweepConfig, sweep_data("s", "o", space, search="random", **{"num_trials": 5, **kw})), {})

    first = random()
    assert [t.config() for t in first] == [t.config() for t in random()]
    assert [t.id for t in random(num_trials=8)[:10]] == [t.id for t in first]  # more samples extend the list
    assert [t.config() for t in random(seed=1)] != [t.config() for t in first]
    assert len(first) == 10 and [t.seed for t in first[:2]] == [0, 1]
    assert all(1e-4 <= t.lr <= 1e-1 and isinstance(t.hparams["num_queries"], int) for t in first)
    # The id hashes the canonical JSON: key order does not matter, the training context does.
    a = new_trial("inca", {"num_heads": 2, "layer": "blocks.0"}, 0.001, 0.0, 0, {"epochs": 2})
    b = new_trial("inca", {"layer": "blocks.0", "num_heads": 2}, 1e-3, 0, 0, {"epochs": 2})
    assert a.id == b.id == "8d70828f28d1"
    assert new_trial("inca", a.hparams, 0.001, 0.0, 0, {"epochs": 3}).id != a.id


def test_jobs_keep_fused_groups_together(store):
    from cache import open_store

    layers = open_store(store).layers
    cfg = build(SweepConfig, sweep_data(store, "o"))
    jobs = plan_jobs(make_trials(cfg, {}), cfg, layers)
    assert [len(j.trials) for j in jobs] == [4, 4, 4]
    for job in jobs:
        members = [trial_member(t, layers) for t in job.trials]
        assert len({m.shape_key for m in members}) == (1 if job.trials[0].kind == "linear" else 2)
        assert list(job.members) == [m.id for m in members]  # what `train` will call each trial's row
        assert len(set(job.members)) == 4 and job.config.save_top == 0 and job.config.output.endswith(job.id)
    # LoSA trials that differ in their layer set are distinct members, so one job (one cache
    # pass) trains both.
    losa = build(SweepConfig, sweep_data(store, "o", [{"kind": "losa", "layers": [["blocks.0", "blocks.5"], ["embed", "blocks.5"]],
                                                       "hparams": {"rank": 2}}]))
    (job,) = plan_jobs(make_trials(losa, {}), losa, layers)
    assert len(job.trials) == 2 and len(set(job.members)) == 2


@pytest.fixture(scope="module")
def dask_sweep(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    cfg = build(SweepConfig, sweep_data(store, out))
    return cfg, run_sweep(cfg, workers=2)


def test_dask_sweep_equals_in_process(dask_sweep, store, tmp_path):
    cfg, result = dask_sweep
    rows = read_rows(Path(cfg.output))
    assert result["jobs"] == 3 and len(rows) == 12 and len({r["trial"] for r in rows}) == 12
    # The same trials trained in this process, all in one run (one entry per trial).
    entries = [{"kind": r["config"]["kind"], "layers": [r["config"]["hparams"]["layer"]],
                "hparams": {k: v for k, v in r["config"]["hparams"].items() if k != "layer"},
                "lr": r["config"]["lr"], "weight_decay": r["config"]["weight_decay"], "seeds": [r["config"]["seed"]]} for r in rows]
    reference = run_train(build(TrainConfig, {**cfg.train_settings(), "store": store, "output": str(tmp_path), "save_top": 0, "adapters": entries}))
    expected = {r["member_id"]: (r["adapter"], r["val_acc"], r["test_acc"]) for r in reference["rows"]}
    assert {r["member_id"]: (r["member"], r["metrics"]["val_acc"], r["metrics"]["test_acc"]) for r in rows} == expected
    assert max(r["metrics"]["val_acc"] for r in rows) >= 0.9
    # The accuracies are nearly saturated here: the validation logits tell one epoch fewer (or
    # other data) apart. Members fused in other groups may round differently in float32 (far below 1e-3).
    ours = {}
    for job in (Path(cfg.output) / "jobs").iterdir():
        saved = np.load(job / "logits.npz")
        ours.update(zip(saved["member_ids"].tolist(), saved["val_logits"]))
    saved = np.load(tmp_path / "logits.npz")
    assert sorted(ours) == sorted(saved["member_ids"].tolist())
    for member, logits in zip(saved["member_ids"].tolist(), saved["val_logits"]):
        np.testing.assert_allclose(ours[member], logits, atol=1e-3, rtol=0, err_msg=member)


def test_outputs_and_best_config(dask_sweep):
    cfg, result = dask_sweep
    out = Path(cfg.output)
    rows = read_rows(out)
    for kind in ("linear", "inca"):
        mine = [r for r in rows if r["config"]["kind"] == kind]
        assert result["best"][kind]["metrics"]["val_acc"] == max(r["metrics"]["val_acc"] for r in mine)
    best_yaml = out / "best_train_config.yaml"
    assert best_yaml.read_text().splitlines()[0] == f"# python -m pipeline train {best_yaml}"
    best = load_config(TrainConfig, str(best_yaml))
    assert [e.kind for e in best.adapters] == ["linear", "inca"] and best.epochs == cfg.epochs
    assert best.adapters[0].lr == result["best"]["linear"]["config"]["lr"]
    table = (out / "results.md").read_text().splitlines()
    accs = [float(line.split("|")[9]) for line in table[2:14]]
    assert len(accs) == 12 and accs == sorted(accs, reverse=True)
    for name in ("lr", "weight_decay", "layer", "num_heads"):
        assert (out / f"score_vs_{name}.png").stat().st_size > 0, name


def test_rerun_skips_finished_trials(dask_sweep, monkeypatch):
    cfg, _ = dask_sweep
    before = (Path(cfg.output) / "trials.jsonl").read_bytes()

    def no_cluster(*args):
        raise AssertionError("a sweep with nothing left to run started a dask cluster")

    monkeypatch.setattr("pipeline.runners.sweep.dask_client", no_cluster)
    again = run_sweep(cfg, workers=2)
    assert again["jobs"] == 0 and again["already_done"] == 12 and len(again["rows"]) == 12
    assert (Path(cfg.output) / "trials.jsonl").read_bytes() == before


def test_partial_line_and_lost_rows_rerun_in_process(dask_sweep, tmp_path):
    """A crash mid-write leaves a partial last line; rows that never arrived are trained again
    (here in this process, through the CLI) and give the same scores as on dask."""
    cfg, _ = dask_sweep
    out = tmp_path / "out"
    shutil.copytree(cfg.output, out)
    rows = read_rows(out)
    lost = [r for r in rows if r["job"] == rows[-1]["job"]]
    kept = [r for r in rows if r["job"] != rows[-1]["job"]]
    (out / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"trial": "abc", "conf')
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**json.loads((out / "sweep_config.json").read_text()), "output": str(out)}))
    assert main(["sweep", str(config), "--workers", "0"]) == 0
    again = read_rows(out)
    assert len(again) == 12 and len({r["trial"] for r in again}) == 12
    assert {r["trial"]: r["metrics"]["val_acc"] for r in again[len(kept):]} == {r["trial"]: r["metrics"]["val_acc"] for r in lost}


def test_killed_worker_job_is_retried(store, tmp_path):
    from distributed import Client

    out = tmp_path / "out"
    cfg = build(SweepConfig, sweep_data(store, out, GRID[:1], epochs=6))  # 8 trials, 2 jobs
    killed, finished = [], threading.Event()

    def kill_a_worker_mid_job(client, pids):
        while not killed and not finished.is_set():
            # A running job writes into its staging folder, jobs/.<job id>.partial-<pid>.
            staging = (out / "jobs").glob(".*.partial-*/config.json") if (out / "jobs").exists() else []
            started = {p.parent.name[1:].rsplit(".partial-", 1)[0] for p in staging}
            for address, keys in client.processing().items():
                if any(str(k).rsplit("-", 1)[-1] in started for k in keys):  # sweep-job-<run>-<job id>
                    os.kill(pids[address], signal.SIGKILL)
                    killed.append(address)
                    break
            time.sleep(0.02)

    with local_cluster(2) as cluster, Client(cluster) as client:  # the cluster `sweep` would start
        killer = threading.Thread(target=kill_a_worker_mid_job, args=(client, client.run(os.getpid)))
        killer.start()
        try:
            result = run_sweep(cfg, scheduler=cluster.scheduler_address)
        finally:
            finished.set()
            killer.join()
    assert killed, "no job was seen running"
    rows = read_rows(out)
    assert result["jobs"] == 2 and len(rows) == 8 and len({r["trial"] for r in rows}) == 8


# search: tpe: Optuna's TPE asked and told on the driver, its study in a journal file beside trials.jsonl.

# Ranges and choices: a space TPE can only sample, never enumerate.
SPACE = [
    {"kind": "linear", "layer": ["blocks.0", "blocks.5"], "lr": {"low": 1e-3, "high": 1e-1, "log": True}, "weight_decay": [0.0, 1.0e-4]},
    {"kind": "inca", "layer": ["blocks.5"], "lr": {"low": 1e-3, "high": 3e-2, "log": True}, "hparams": {"num_heads": [2, 4]}},
]


def study_trials(out):
    optuna = pytest.importorskip("optuna", reason="optuna is not installed (pip install -e '.[dev]' installs it)")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def test_tpe_config_problems():
    with pytest.raises(ConfigError) as e:
        build(SweepConfig, sweep_data("s", "o", search="tpe", space=[{**SPACE[0], "seeds": [0, 1]}]))
    assert "num_trials: got None, expected an integer > 0 for search: tpe" in str(e.value)
    assert "space[0].seeds: got [0, 1], but search: tpe tells one value per configuration" in str(e.value)


def test_integer_ranges_hold_the_integers_inside_low_high(tmp_path):
    """num_queries {low: 1.5, high: 3.5} is 2 or 3 for TPE and random search alike (TPE used
    to round the ends half to even: 4 was proposed); a range with no integer is refused."""
    pytest.importorskip("optuna", reason="optuna is not installed (pip install -e '.[dev]' installs it)")
    from pipeline.sweeping.tpe import TpeSearch

    space = [{"kind": "inca", "hparams": {"num_queries": {"low": 1.5, "high": 3.5}}}]
    cfg = build(SweepConfig, sweep_data("s", tmp_path, space, search="tpe", num_trials=40))
    proposed = [trial.hparams["num_queries"] for _, trial in TpeSearch(cfg, {"store": "x"}, tmp_path).ask(40)]
    sampled = [t.hparams["num_queries"] for t in make_trials(build(SweepConfig, sweep_data("s", tmp_path, space, search="random",
                                                                                              num_trials=40)), {"store": "x"})]
    assert set(proposed) == {2, 3} and set(sampled) == {2, 3}
    with pytest.raises(ConfigError, match=r"space\[0\].hparams.num_queries: got low=4.2, high=4.8, which holds no integer"):
        build(SweepConfig, sweep_data("s", tmp_path, [{"kind": "inca", "hparams": {"num_queries": {"low": 4.2, "high": 4.8}}}],
                                      search="random", num_trials=3))


def test_random_search_draws_each_integer_of_a_range_as_optuna_defines_it(tmp_path):
    """Rounding a draw over [1, 4] gave 1 and 4 half the weight of 2 and 3 (TPE's suggest_int
    draws them evenly); a log range covers k with [k - 0.5, k + 0.5) on the log scale."""
    space = [{"kind": "inca", "lr": {"low": 1e-4, "high": 1e-1, "log": True},  # distinct trials: equal ones are one trial
              "hparams": {"num_queries": {"low": 1, "high": 4}, "num_heads": {"low": 1, "high": 8, "log": True}}}]
    trials = make_trials(build(SweepConfig, sweep_data("s", tmp_path, space, search="random", num_trials=8000)), {"store": "x"})
    for key, expected in [("num_queries", {k: 1 / 4 for k in range(1, 5)}),
                          ("num_heads", {k: (math.log(k + 0.5) - math.log(k - 0.5)) / (math.log(8.5) - math.log(0.5)) for k in range(1, 9)})]:
        drawn = [t.hparams[key] for t in trials]
        assert all(isinstance(v, int) for v in drawn)
        for k, p in expected.items():  # 8,000 seeded draws: 0.02 is over 4 standard errors
            assert abs(drawn.count(k) / len(drawn) - p) < 0.02, (key, k, drawn.count(k) / len(drawn), p)


def test_a_diverged_trial_is_told_the_worst_accuracy_and_a_torn_journal_line_is_dropped(tmp_path):
    """A half-NaN member scored 0.89 on the samples it still scored: told that, TPE spent its
    next proposals beside a configuration the sweep never exports. A journal line cut short
    (a full disk) made every later run of the study fail to read it."""
    pytest.importorskip("optuna", reason="optuna is not installed (pip install -e '.[dev]' installs it)")
    from pipeline.sweeping.tpe import TpeSearch

    cfg = build(SweepConfig, sweep_data("s", tmp_path, SPACE, search="tpe", num_trials=3))
    search = TpeSearch(cfg, {"store": "x"}, tmp_path)
    (a, _), (b, _), (c, _) = search.ask(3)
    search.tell(a, {"metrics": {"val_acc": 0.89, "diverged": True}})
    search.tell(b, {"metrics": {"val_acc": 0.55}})
    assert search.best_value() == 0.55 and search.finished() == 2
    journal = tmp_path / "study.journal"
    journal.write_bytes(journal.read_bytes()[:-20])  # the last record, trial b's tell, torn
    again = TpeSearch(cfg, {"store": "x"}, tmp_path)
    again.recover({})  # b is RUNNING again, with no row to tell it from: failed; c never trained: failed
    assert again.best_value() == 0.0 and again.finished() == 1
    assert [t.state.name for t in study_trials(tmp_path)] == ["COMPLETE", "FAIL", "FAIL"]


def test_every_trial_is_told_the_validation_accuracy_of_its_row(store, tmp_path):
    out = tmp_path / "tpe"
    result = run_sweep(build(SweepConfig, sweep_data(store, out, SPACE, search="tpe", num_trials=10)), workers=0)
    rows = {r["trial"]: r for r in read_rows(out)}
    trials = study_trials(out)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 10 and len(result["rows"]) == len(rows)
    for t in complete:  # the oracle: the row `train` wrote for that configuration
        assert t.value == rows[t.user_attrs["trial_id"]]["metrics"]["val_acc"]
    for row in rows.values():
        config = row["config"]
        entry = SPACE[0] if config["kind"] == "linear" else SPACE[1]
        assert entry["lr"]["low"] <= config["lr"] <= entry["lr"]["high"]
        assert config["hparams"]["layer"] in entry["layer"]
    assert (out / "results.md").exists() and (out / "best_train_config.yaml").exists()


def test_a_killed_tpe_sweep_resumes_without_training_a_trial_twice(store, tmp_path):
    out = tmp_path / "tpe"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep_data(store, out, SPACE, search="tpe", num_trials=12)))
    child = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "sweep", str(config), "--workers", "0"], cwd=REPO,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and child.poll() is None:
        if (out / "trials.jsonl").exists() and len(read_rows(out)) >= 1:
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    trained_before = len(read_rows(out))
    assert 1 <= trained_before < 12, f"the child should be killed mid-sweep, it had trained {trained_before}"

    again = run_sweep(build(SweepConfig, sweep_data(store, out, SPACE, search="tpe", num_trials=12)), workers=0)
    lines = read_rows(out)
    assert len({r["trial"] for r in lines}) == len(lines)  # no configuration trained twice
    complete = [t for t in study_trials(out) if t.state.name == "COMPLETE"]
    assert len(complete) == 12
    # Continuous learning rates: 12 distinct configurations, unless the rerun replayed the first run's proposals.
    assert len({t.user_attrs["trial_id"] for t in complete}) == 12
    assert again["already_done"] >= 0 and {r["trial"] for r in lines} >= {t.user_attrs["trial_id"] for t in complete}
    assert json.loads((out / "sweep_config.json").read_text())["search"] == "tpe"


def test_a_second_driver_on_one_output_folder_is_refused(store, tmp_path):
    from cache import StoreError
    from cache.lease import StoreLease
    from cache.location import StoreLocation

    out = tmp_path / "sweep"
    with StoreLease(StoreLocation(str(out)), what="sweep output folder"):  # a running driver's lease
        with pytest.raises(StoreError, match=r"sweep output folder '.*sweep' is being written by .*pid"):
            run_sweep(build(SweepConfig, sweep_data(store, out)), workers=0)
    assert not (out / "trials.jsonl").exists() and not (out / "sweep_config.json").exists()  # nothing touched


def test_a_folder_that_is_not_a_sweeps_own_is_refused_untouched(store, tmp_path):
    """A sweep into a train run's folder wrote its results.md over the run's; into a store, among
    its arrays. Its own folder is resumed."""
    from pipeline.training.output import OutputInUse

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.md").write_text("the train run's table")
    (run / "config.json").write_text("{}")
    with pytest.raises(OutputInUse, match=r"sweep output '.*run' holds files but is not a sweep's output \(no sweep_config.json\)"):
        run_sweep(build(SweepConfig, sweep_data(store, run)), workers=0)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "results.md"]
    assert (run / "results.md").read_text() == "the train run's table"
    with pytest.raises(OutputInUse, match="holds files but is not a sweep's output"):
        run_sweep(build(SweepConfig, sweep_data(store, store)), workers=0)

    out = tmp_path / "sweep"
    data = sweep_data(store, out, space=[{"kind": "linear", "layer": ["blocks.5"], "lr": [0.01]}], epochs=1)
    first = run_sweep(build(SweepConfig, data), workers=0)
    again = run_sweep(build(SweepConfig, data), workers=0)  # its own folder: resumed
    assert first["trials"] == again["trials"] == again["already_done"] == 1


def test_pruned_trials_are_recorded_and_never_the_best(store, tmp_path):
    """Successive halving across jobs: the first job's rung values are the later jobs' history."""
    out = tmp_path / "pruned"
    space = [{"kind": "linear", "layer": ["blocks.0", "blocks.5"], "lr": [1e-5, 1e-4, 1e-3, 3e-2], "weight_decay": [0.0]}]
    result = run_sweep(build(SweepConfig, sweep_data(store, out, space, epochs=4, pruning={"min_epochs": 1, "reduction_factor": 2})),
                       workers=0)
    rows = read_rows(out)
    pruned = [r for r in rows if r["metrics"]["pruned_at"] is not None]
    assert pruned and len(pruned) < len(rows)
    assert all(set(r["metrics"]["rung_acc"]) <= {"1", "2"} for r in rows)
    # The second job (blocks.5) was ranked against the first job's rung values too: a trial
    # below the top half of every value at epoch 1 never trains past it.
    at_1 = sorted((r["metrics"]["rung_acc"]["1"] for r in rows), reverse=True)
    job_order = list(dict.fromkeys(r["job"] for r in rows))
    second = [r for r in rows if r["job"] == job_order[1]]
    history = [r["metrics"]["rung_acc"]["1"] for r in rows if r["job"] == job_order[0]]
    for r in second:
        competing = sorted(history + [s["metrics"]["rung_acc"]["1"] for s in second], reverse=True)
        assert (r["metrics"]["pruned_at"] == 1) == (r["metrics"]["rung_acc"]["1"] < competing[len(competing) // 2 - 1])
    best = result["best"]["linear"]
    assert best["metrics"]["pruned_at"] is None and at_1
    assert "pruning" not in yaml.safe_load((out / "best_train_config.yaml").read_text())  # the winners train to the end
    assert best["trial"] not in {r["trial"] for r in pruned}
    assert "stopped at epoch" in (out / "results.md").read_text()
    assert (out / "score_vs_lr.png").exists() and (out / "score_vs_layer.png").exists()

    # A rerun in the same folder over a space of one pruned configuration: no trial of it
    # trained to the end, so nothing is the best; the first run's best config and plots go.
    p = pruned[0]["config"]
    narrow = [{"kind": "linear", "layer": [p["hparams"]["layer"]], "lr": [p["lr"]], "weight_decay": [p["weight_decay"]]}]
    again = run_sweep(build(SweepConfig, sweep_data(store, out, narrow, epochs=4, pruning={"min_epochs": 1, "reduction_factor": 2})),
                      workers=0)
    assert again["best"] == {} and again["trials"] == 1
    assert not (out / "best_train_config.yaml").exists() and not list(out.glob("score_vs_*.png"))
    assert pruned[0]["trial"] in (out / "results.md").read_text() and best["trial"] not in (out / "results.md").read_text()


def test_tpe_with_pruning_tells_pruned_trials_as_pruned(store, tmp_path):
    out = tmp_path / "tpe_pruned"
    cfg = build(SweepConfig, sweep_data(store, out, SPACE, search="tpe", num_trials=8, epochs=4,
                                        pruning={"min_epochs": 1, "reduction_factor": 2}))
    run_sweep(cfg, workers=0)
    rows = {r["trial"]: r for r in read_rows(out)}
    told = [t for t in study_trials(out) if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(told) == 8
    for t in told:
        row = rows[t.user_attrs["trial_id"]]
        assert (t.state.name == "PRUNED") == (row["metrics"]["pruned_at"] is not None)
        assert t.intermediate_values == {int(e): v for e, v in row["metrics"]["rung_acc"].items()}


def test_a_job_refuses_a_store_extracted_again_since_the_sweep_opened_it(tmp_path, monkeypatch):
    """Trial ids carry the store's fingerprint as the driver read it; a job that trained on
    another store at the same path (re-extracted meanwhile, or another host's copy) would rank
    its row beside the others'. It fails instead, and the sweep says which job."""
    import pipeline.runners.sweep as sweep

    cfg = tiny_config(tmp_path / "a", colour_folder(tmp_path / "images", seed=0), "backbone.layers=[0, -1]",
                      "store.samples_per_chunk=8")
    run_extract(cfg)
    other = tiny_config(tmp_path / "a", colour_folder(tmp_path / "other", seed=1), "backbone.layers=[0, -1]",
                        "store.samples_per_chunk=8")
    real, jobs = sweep.run_job, []

    def extracted_again_before_the_second_job(train_cfg, *args):
        if jobs:
            run_extract(other, overwrite=True)
        jobs.append(train_cfg.store_creation)
        return real(train_cfg, *args)

    monkeypatch.setattr(sweep, "run_job", extracted_again_before_the_second_job)
    space = [{"kind": "linear", "layer": ["blocks.0", "blocks.5"], "lr": [0.03]}]
    with pytest.raises(sweep.SweepJobsFailed, match="1 of 2 jobs failed"):
        run_sweep(build(SweepConfig, sweep_data(cfg.store.path, tmp_path / "out", space, trials_per_job=1)), workers=0)
    assert len(jobs) == 2 and jobs[0] is not None and len(read_rows(tmp_path / "out")) == 1


def test_a_split_the_store_lacks_is_refused_before_any_job(store, tmp_path, monkeypatch):
    """Every job failed on it, three tries each, and the advice to rerun failed the same way."""
    from pipeline.runners import sweep

    monkeypatch.setattr(sweep, "_run_jobs", lambda *a, **k: pytest.fail("a job ran"))
    with pytest.raises(ConfigError, match=r"test_split: split 'test' is not in store .*; it has \['train', 'val'\]"):
        run_sweep(build(SweepConfig, sweep_data(store, tmp_path / "out", test_split="test")), workers=0)
