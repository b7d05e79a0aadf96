"""The run's decisions (policy.py) from tables: no processes, no devices, milliseconds."""
import pytest

from dist_train.config import CheckpointConfig, TrainConfig
from dist_train.loop.policy import EvalRules, StepDecision, StepRules, is_improvement

# batches_per_epoch, max_steps, every_n_steps; step, batches_done, preempted, timed -> save, preempt, end_epoch
STEP_CASES = [
    # nothing to do
    ((20, None, None), (5, 5, False, False), (False, False, False)),
    ((20, None, None), (20, 20, False, False), (False, False, False)),
    # periodic saves: only in the middle of an epoch (the epoch's own save follows at its end)
    ((20, None, 5), (5, 5, False, False), (True, False, False)),
    ((20, None, 5), (10, 10, False, False), (True, False, False)),
    ((20, None, 5), (7, 7, False, False), (False, False, False)),
    ((20, None, 5), (20, 20, False, False), (False, False, False)),
    ((20, None, 5), (25, 5, False, False), (True, False, False)),  # second epoch, step 25 is its 5th
    ((20, None, 5), (40, 20, False, False), (False, False, False)),
    ((20, None, 1), (19, 19, False, False), (True, False, False)),
    # accumulation: batches_done counts micro-batches, steps count windows
    ((20, None, 5), (5, 10, False, False), (True, False, False)),
    ((20, None, 5), (10, 20, False, False), (False, False, False)),
    # timed saves (agreed at a check step) behave as periodic ones
    ((20, None, None), (5, 5, False, True), (True, False, False)),
    ((20, None, None), (20, 20, False, True), (False, False, False)),
    # preemption saves wherever it is, and stops
    ((20, None, None), (5, 5, True, False), (True, True, False)),
    ((20, None, None), (20, 20, True, False), (True, True, False)),
    ((20, None, 5), (5, 5, True, True), (True, True, False)),
    ((20, 30, None), (30, 10, True, False), (True, True, True)),
    # max_steps ends the epoch; the epoch's own save follows, so no mid-epoch save
    ((20, 30, None), (30, 10, False, False), (False, False, True)),
    ((20, 30, 5), (30, 10, False, False), (False, False, True)),
    ((20, 30, 5), (25, 5, False, False), (True, False, False)),
    ((20, 30, None), (29, 9, False, False), (False, False, False)),
    ((20, 30, None), (31, 11, False, False), (False, False, True)),
    ((20, 20, None), (20, 20, False, False), (False, False, True)),
    ((20, 30, None), (30, 10, False, True), (False, False, True)),
]


@pytest.mark.parametrize("rules,facts,expected", STEP_CASES)
def test_after_step(rules, facts, expected):
    assert StepRules(*rules).after_step(*facts) == StepDecision(*expected)


@pytest.mark.parametrize("every,step,checks", [(5, 5, True), (5, 4, False), (5, 10, True), (1, 7, True), (3, 0, True), (10, 25, False)])
def test_check_steps(every, step, checks):
    assert StepRules(20, check_every_n_steps=every).checks_at(step) == checks


@pytest.mark.parametrize("minutes,seconds,due", [(None, 1e9, False), (1.0, 59.9, False), (1.0, 60.0, True), (0.5, 31, True),
                                                 (2.5, 149, False)])
def test_timed_saves(minutes, seconds, due):
    assert StepRules(20, every_n_minutes=minutes).timed_save_due(seconds) == due


def test_step_rules_from_the_config():
    rules = StepRules.of(TrainConfig(max_steps=7), CheckpointConfig(every_n_steps=3, every_n_minutes=2.0, check_every_n_steps=4), 11)
    assert rules == StepRules(11, 7, 3, 2.0, 4)


@pytest.mark.parametrize("value,best,mode,improved", [
    (0.5, None, "max", True), (0.5, None, "min", True), (0.6, 0.5, "max", True), (0.5, 0.5, "max", False),
    (0.4, 0.5, "max", False), (0.4, 0.5, "min", True), (0.5, 0.5, "min", False), (0.6, 0.5, "min", False),
    (float("nan"), 0.5, "max", False), (float("nan"), 0.5, "min", False), (float("nan"), None, "max", True),
])
def test_is_improvement(value, best, mode, improved):
    assert is_improvement(value, best, mode) == improved


# mode, epochs, patience, max_steps; value, best, waited, epoch, step -> improved, waited, stop
EVAL_CASES = [
    (("max", 10, 0, None), (0.9, None, 0, 1, 20), (True, 0, None)),
    (("max", 10, 0, None), (0.8, 0.9, 3, 5, 100), (False, 4, None)),  # patience 0: never stops early
    (("max", 10, 2, None), (0.8, 0.9, 0, 2, 40), (False, 1, None)),
    (("max", 10, 2, None), (0.8, 0.9, 1, 3, 60), (False, 2, "patience")),
    (("max", 10, 2, None), (0.95, 0.9, 1, 3, 60), (True, 0, None)),
    (("max", 10, 2, None), (0.8, 0.9, 1, 10, 200), (False, 2, None)),  # the last epoch: no early stop to announce
    (("max", 10, 2, None), (0.8, 0.9, 5, 9, 180), (False, 6, "patience")),
    (("min", 10, 1, None), (0.3, 0.2, 0, 4, 80), (False, 1, "patience")),
    (("min", 10, 1, None), (0.1, 0.2, 0, 4, 80), (True, 0, None)),
    (("min", 10, 3, None), (0.2, 0.2, 1, 4, 80), (False, 2, None)),  # equal is no improvement
    (("max", 10, 0, 50), (0.9, None, 0, 2, 50), (True, 0, "max_steps")),
    (("max", 10, 0, 50), (0.9, None, 0, 2, 40), (True, 0, None)),
    (("max", 10, 1, 50), (0.8, 0.9, 0, 3, 50), (False, 1, "max_steps")),  # max_steps wins over patience
    (("max", 3, 1, None), (0.8, 0.9, 0, 3, 60), (False, 1, None)),
    (("max", 10, 1, None), (float("nan"), 0.9, 0, 2, 40), (False, 1, "patience")),
]


@pytest.mark.parametrize("rules,facts,expected", EVAL_CASES)
def test_after_evaluation(rules, facts, expected):
    decision = EvalRules(*rules).after_evaluation(*facts)
    assert (decision.improved, decision.evals_without_improvement, decision.stop) == expected


@pytest.mark.parametrize("max_steps,step,starts", [(None, 10**9, True), (50, 49, True), (50, 50, False), (50, 60, False)])
def test_starts_epoch(max_steps, step, starts):
    assert EvalRules("max", 10, max_steps=max_steps).starts_epoch(step) == starts


def test_eval_rules_from_the_config():
    rules = EvalRules.of(TrainConfig(epochs=4, early_stopping_patience=2, max_steps=9), CheckpointConfig(mode="min"))
    assert rules == EvalRules("min", 4, 2, 9)
