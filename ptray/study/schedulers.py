"""The Tune scheduler of a declared search (``scheduler = "asha"``): one ``ASHAScheduler`` per task (and condition),
since eval losses of different tasks are not comparable. Imports Ray: ``ptray.study.tuner`` imports it when a study
has a scheduler."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ptray.study.trial import trial_members


class PerTaskASHA(FIFOScheduler):
    """One ``ASHAScheduler`` (time attribute ``epoch``, grace period 1 epoch, its default reduction factor 4) per
    (task, condition) of the trials, so that its rungs compare like with like; trials start first in, first out.

    ``stop_last_trials`` is off: a trial that reaches its last epoch finishes its MLflow run itself; only the
    scheduler's early stops leave a run unfinished (``ptray.study.tuner.finish_stopped`` marks it KILLED).
    """

    _supports_buffered_results = False  # as ASHA: each epoch's result is judged when it comes

    def __init__(self, metric: str, mode: str, max_t: int, by_condition: bool):
        super().__init__()
        self._metric, self._mode = metric, mode
        self._args = dict(time_attr="epoch", metric=metric, mode=mode, max_t=max(max_t, 1), grace_period=1,
                          stop_last_trials=False)
        self._by_condition = by_condition
        self._points: dict[tuple, ASHAScheduler] = {}

    def point(self, config: dict) -> tuple:
        """The (task, declared condition) a trial's config belongs to (a search's sample suffix removed)."""
        member = trial_members(config)[0]
        condition = member[2].rsplit("-sample", 1)[0] if self._by_condition and len(member) > 2 else None
        return member[0], condition

    def _of(self, trial) -> ASHAScheduler:
        key = self.point(trial.config)
        if key not in self._points:
            self._points[key] = ASHAScheduler(**self._args)
        return self._points[key]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        """Metric and mode are the declaration's (set at construction)."""
        return True

    def on_trial_add(self, tune_controller, trial):
        """Registered with its task's ASHA."""
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        """Its task's ASHA decides: continue, or stop at a rung."""
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        """Recorded in its task's ASHA."""
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        """Removed from its task's ASHA."""
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        """Each task's ASHA, for Tune's status table."""
        return "ASHA per task: " + "; ".join(f"{task}{'/' + c if c else ''}: {s.debug_string()}"
                                              for (task, c), s in self._points.items())
