"""`search: tpe`: Optuna's TPE sampler over the sweep's space, asked and told on the driver.

The driver asks the sampler for a batch of configurations (enough to fill a fused job per
worker), trains them as ordinary sweep jobs, appends their rows to trials.jsonl, then tells
the study each trial's validation accuracy, and asks again, until `num_trials` are told.
TPE's `constant_liar` keeps a batch's proposals apart while none of them is told yet.

With `pruning:`, a trial's validation accuracies at the rungs it reached are reported as its
intermediate values, and a trial that pruning stopped is told PRUNED (TPE then ranks it by
its last rung value), so `num_trials` counts trials told either way.

The study lives in OUTPUT/study.journal (Optuna's JournalStorage: an append-only file), so
a rerun continues it. Its name hashes the space and everything that decides a result (the
store's fingerprint, the shared train settings): a changed sweep starts a new study in the
same file. A trial asked but never told (the driver was killed) is told on the rerun from
its row in trials.jsonl when the row was written, and marked failed otherwise (its
configuration is asked again by the sampler if it is still promising), so no configuration
is trained twice: a proposal whose trial id already has a row is told that row's value
without training.

A space entry's choice axes are categorical parameters (JSON of the value), its ranges
`suggest_float` / `suggest_int` (log when `log: true`), each named `<entry>.<axis>`; with
several entries, a categorical `entry` picks one first (TPE samples the others' parameters
only when their entry is picked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from cache import require_extra
from pipeline.config import to_dict
from pipeline.config.sweep_config import Range, SweepConfig, integer_hparam
from pipeline.sweeping.space import Trial, entry_axes, new_trial, significant

log = logging.getLogger(__name__)

TRIAL_ID = "trial_id"  # the user attribute that ties an Optuna trial to its row in trials.jsonl


class TpeSearch:
    def __init__(self, cfg: SweepConfig, context: dict, out: Path):
        require_extra("search: tpe", "optuna", "optuna")
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log says what happens
        self.cfg, self.context = cfg, context
        self.optuna = optuna
        space = json.dumps({"space": [to_dict(e) for e in cfg.space], "context": context}, sort_keys=True, default=str)
        name = "sweep-" + hashlib.sha256(space.encode()).hexdigest()[:12]
        # The journal's own lock file would outlive a SIGKILL (the rerun waits 30 s, then
        # breaks it); the sweep driver holds its output folder's lease instead (run_sweep).
        _drop_torn_line(out / "study.journal")
        storage = JournalStorage(JournalFileBackend(str(out / "study.journal"), lock_obj=_lease_held()))
        self.study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
        # Seeded by the sweep's seed and how far the study got: a rerun continues the search
        # instead of replaying the first run's proposals (TPE's first ones are random draws).
        seed = int(np.random.SeedSequence([cfg.seed, len(self.study.trials)]).generate_state(1)[0])
        # multivariate + group: one joint density per space entry (the space is conditional on
        # `entry`), as Optuna's docs recommend after BOHB's comparison. On bench_search's space,
        # with pruning, it reached the grid's best on 2 of 3 sampler seeds, as univariate did.
        with warnings.catch_warnings():  # both options are "experimental" in Optuna's terms
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True, group=True)
        self.path = out / "study.journal"
        self._asked: dict[int, object] = {}  # trial number -> the optuna Trial asked in this run

    def _told(self) -> list:
        states = (self.optuna.trial.TrialState.COMPLETE, self.optuna.trial.TrialState.PRUNED)
        return self.study.get_trials(deepcopy=False, states=states)

    def finished(self) -> int:
        """Trials told a result: trained to the end, or stopped by pruning."""
        return len(self._told())

    def finished_ids(self) -> list[str]:
        return [t.user_attrs[TRIAL_ID] for t in self._told() if TRIAL_ID in t.user_attrs]

    def known_ids(self) -> set[str]:
        """The sweep trials this study has asked for, told or not."""
        return {t.user_attrs[TRIAL_ID] for t in self.study.get_trials(deepcopy=False) if TRIAL_ID in t.user_attrs}

    def best_value(self) -> float:
        complete = self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.COMPLETE,))
        return max((t.value for t in complete), default=float("nan"))

    def recover(self, rows: dict[str, dict]) -> None:
        """Settle trials an interrupted run asked and never told: from their row, else failed."""
        told = failed = 0
        for t in self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.RUNNING,)):
            row = rows.get(t.user_attrs.get(TRIAL_ID))
            if row is not None:
                self._asked[t.number] = self.optuna.trial.Trial(self.study, t._trial_id)  # to report its rung values
                self.tell(t.number, row)
                told += 1
            else:
                self.tell(t.number, None)
                failed += 1
        if told or failed:
            log.info("%s: an interrupted run left %d trials asked: %d told from trials.jsonl, %d never trained (marked failed)",
                     self.path, told + failed, told, failed)

    def ask(self, n: int) -> list[tuple[int, Trial]]:
        """n proposals: (Optuna trial number, the sweep trial it trains)."""
        out = []
        for _ in range(n):
            ot = self.study.ask()
            trial = self._suggest(ot)
            ot.set_user_attr(TRIAL_ID, trial.id)
            self._asked[ot.number] = ot
            out.append((ot.number, trial))
        return out

    def tell(self, number: int, row: dict | None) -> None:
        """A trained trial's validation accuracy (with its values at the rungs it reached, and
        pruned if pruning stopped it); None: its job failed."""
        states = self.optuna.trial.TrialState
        if row is None:
            self.study.tell(number, state=states.FAIL)
            return
        metrics = row["metrics"]
        asked = self._asked.pop(number, None)
        if asked is not None:
            for epoch, value in metrics.get("rung_acc", {}).items():
                asked.report(value, int(epoch))
        if metrics.get("pruned_at") is not None:
            self.study.tell(number, state=states.PRUNED)
        elif metrics.get("diverged"):
            # Its accuracy counts only the samples it still scored (0.89 on a half-NaN run):
            # told as such, TPE spent its next proposals beside a configuration the sweep
            # never exports. The worst accuracy steers it away, and the trial still counts.
            self.study.tell(number, 0.0)
        else:
            self.study.tell(number, metrics["val_acc"])

    def _suggest(self, ot) -> Trial:
        space = self.cfg.space
        index = 0
        if len(space) > 1:
            index = int(ot.suggest_categorical("entry", [str(i) for i in range(len(space))]))
        entry = space[index]
        point = {key: _suggest_axis(ot, f"{index}.{key}", axis, integer_hparam(entry.kind, key)) for key, axis in entry_axes(entry).items()}
        lr, wd = point.pop("lr"), point.pop("weight_decay")
        seed = entry.seeds[0] if entry.seeds else self.cfg.seed
        return new_trial(entry.kind, point, lr, wd, seed, self.context)


def _suggest_axis(ot, name: str, axis, integer: bool):
    if isinstance(axis, Range):
        if integer:
            return ot.suggest_int(name, *axis.integers(), log=axis.log)
        return significant(ot.suggest_float(name, axis.low, axis.high, log=axis.log))
    choices = [json.dumps(v) for v in axis]
    return axis[choices.index(ot.suggest_categorical(name, choices))]  # the value itself, in YAML's own type


def _drop_torn_line(path: Path) -> None:
    """Cut a partial last line (a write torn by a full disk or a power loss): Optuna skips it
    when reading, then glues its next record onto it, and every later read of the study fails.
    The trial whose record was lost is still RUNNING, and `recover` settles it from its row."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: its last record was cut short (%d bytes); dropping it (an interrupted write)", path, len(data) - keep)
        with path.open("r+b") as f:
            f.truncate(keep)


def _lease_held():
    """A journal lock that is always free: only the driver holding the sweep's lease writes the journal."""
    from optuna.storages.journal._file import BaseJournalFileLock

    class LeaseHeld(BaseJournalFileLock):
        def acquire(self) -> bool:
            return True

        def release(self) -> None:
            pass

    return LeaseHeld()
