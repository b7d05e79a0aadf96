"""Hyper-parameter search (hpo.trials): real studies on the digits, tiny (8x8 images, an MLP of width 4-16, 2 epochs).

A 3-trial x 2-fold study on 2 processes (shared by the tests that read it): each trial's objective is its own OOF score,
its parameters are in its config.yaml, best.yaml trains and predict.py takes the study. Two workers started together
share one study without training a trial twice; a trial killed mid-way is resumed by the next worker from its
checkpoint and ends with the weights of the uninterrupted one; a pruned trial stops at the same fold on every rank; a
bad search space is one line before anything trains; a RUNNING trial is taken over only when its worker is gone.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import slurm
import yaml
from conftest import (
    BIN,
    ROOT,
    assert_killed,
    command,
    config_path,
    read_jsonl,
    run_cli,
    run_env,
    tiny_overrides,
)

from dist_train.commands.cli import train_main
from dist_train.commands.hpo import STUDY_LOCK
from dist_train.config import load_config
from dist_train.job.faults import FAULT_ENV
from dist_train.rundir.runlock import Holder, RunLock

SPACE = {"hpo.space.optim.lr": "{type: float, low: 1e-3, high: 1e-1, log: true}",
         "hpo.space.model.width": "{type: int, low: 4, high: 16}"}


def study_args(digits_root, out, **extra) -> list[str]:
    """configs/digits.yaml made tiny, cross-validated on 2 folds (5 optimizer steps an epoch on 2 processes), searched
    over the learning rate and the MLP's width."""
    values = {"model.name": "mlp", "model.width": 8, "data.batch_size": 64, "data.val": "null", "cv.folds": 2,
              "tracking.images": "false", "hpo.trials": 3, **SPACE, **extra}
    return ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **values)]


def summary_of(out) -> dict:
    return json.loads((out / "hpo_summary.json").read_text())


def fold_digests(trial_dir) -> list[list[str]]:
    return [json.loads((trial_dir / f"fold-{k}" / "run_info.json").read_text())["final_weights_sha256_per_rank"]
            for k in (0, 1)]


@pytest.fixture(scope="module")
def study(digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("hpo") / "study"
    return out, run_cli("train.py", study_args(digits_root, out), processes=2, timeout=600)


def test_each_trial_is_scored_on_its_own_out_of_fold_predictions(study):
    out, proc = study
    summary = summary_of(out)
    trials = summary["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2] and {t["state"] for t in trials} == {"COMPLETE"}
    assert summary["objective"] == "val_accuracy" and summary["direction"] == "maximize"
    assert len({(t["params"]["optim.lr"], t["params"]["model.width"]) for t in trials}) == 3  # each its own point
    for t in trials:
        run = out / t["dir"]
        cv = json.loads((run / "cv_summary.json").read_text())
        assert t["value"] == cv["oof"]["val_accuracy"]  # the recorded objective is the trial's own OOF score
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert (saved["optim"]["lr"], saved["model"]["width"]) == (t["params"]["optim.lr"], t["params"]["model.width"])
        assert saved["hpo"]["trials"] == 0 and saved["cv"]["folds"] == 2
        for k in (0, 1):  # every fold trained on both ranks, ending with the same weights there
            info = json.loads((run / f"fold-{k}" / "run_info.json").read_text())
            assert info["num_processes"] == 2 and len(set(info["final_weights_sha256_per_rank"])) == 1
            assert yaml.safe_load((run / f"fold-{k}" / "config.yaml").read_text())["model"]["width"] == t["params"]["model.width"]
        assert t["stopped_at_per_rank"] == [{"fold": 1, "epoch": None}] * 2
        assert t["reported"] == {str(k): pytest.approx(cv["per_fold"][k]["val_accuracy"]) for k in (0, 1)}
    best = max(trials, key=lambda t: t["value"])
    assert summary["best"] == {"number": best["number"], "params": best["params"], "value": best["value"], "dir": best["dir"]}
    table = [line.split() for line in proc.stdout.splitlines() if line.split()[:2] in ([str(n), "COMPLETE"] for n in range(3))]
    assert [row[2] for row in table] == [f"{t['value']:.4f}" for t in trials] and table[best["number"]][-2:] == ["*", "best"]
    assert (out / "hpo_history.png").stat().st_size > 0 and (out / "hpo_importance.png").stat().st_size > 0


def test_every_trial_is_in_tensorboards_hparams_tab(study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = study
    for t in summary_of(out)["trials"]:
        events = EventAccumulator(str(out / "tensorboard" / t["dir"]))
        events.Reload()
        assert events.PluginTagToContent("hparams")  # the experiment and this trial's session
        assert events.Scalars("hparam/val_accuracy")[0].value == pytest.approx(t["value"])


def test_best_yaml_trains_and_predict_takes_the_study(study, tmp_path):
    out, _ = study
    best = summary_of(out)["best"]
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert config["hpo"]["trials"] == 0 and config["output_dir"] == str(out / "best")
    assert (config["optim"]["lr"], config["model"]["width"]) == (best["params"]["optim.lr"], best["params"]["model.width"])
    run_cli("train.py", ["--config", str(out / "best.yaml"), "train.epochs=1", "cv.folds=0", "data.val=val.csv",
                         "data.num_workers=0", f"output_dir={tmp_path / 'best'}"])
    info = json.loads((tmp_path / "best" / "run_info.json").read_text())
    assert info["parameters"]["trainable"] == 64 * best["params"]["model.width"] + best["params"]["model.width"] + \
        (best["params"]["model.width"] + 1) * 10  # the MLP of the best trial's width
    # the study's directory predicts with its best trial's fold ensemble, as that trial's directory does
    proc = run_cli("predict.py", ["--checkpoint", str(out), "--output", str(tmp_path / "study.csv"), "data.num_workers=0"])
    assert f"--checkpoint {out}: a study: its best trial, {out / best['dir']}" in proc.stdout
    assert "averaging 2 checkpoints" in proc.stdout
    run_cli("predict.py", ["--checkpoint", str(out / best["dir"]), "--output", str(tmp_path / "trial.csv"), "data.num_workers=0"])
    assert (tmp_path / "study.csv").read_bytes() == (tmp_path / "trial.csv").read_bytes()
    assert len((tmp_path / "study.csv").read_text().splitlines()) == 271


def test_a_trial_killed_mid_way_is_resumed_by_the_next_worker_and_ends_as_if_uninterrupted(study, digits_root, tmp_path):
    reference, out = study[0], tmp_path / "study"
    args = study_args(digits_root, out, **{"hpo.trials": 2})
    killed = run_cli("train.py", args, processes=2, check=False, env={FAULT_ENV: "kill@step:7"}, timeout=300)
    assert_killed(killed)
    assert not (out / "trial-0" / "fold-1").exists()
    again = run_cli("train.py", args, processes=2, timeout=600)
    assert "hpo: trial 0 (1 of 2)" in again.stdout and "resumed: its worker is gone" in again.stdout
    resumed = re.search(rf"resumed from {re.escape(str(out / 'trial-0' / 'fold-0' / 'checkpoints'))}/step-(\d+)", again.stdout)
    assert resumed and 0 < int(resumed.group(1)) < 7  # from the checkpoint the killed worker left, not from the start
    summary, theirs = summary_of(out), summary_of(reference)
    assert [(t["number"], t["state"]) for t in summary["trials"]] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert len(summary["trials"][0]["workers"]) == 2  # the killed worker and the one that finished it
    for number in (0, 1):  # the same parameters as the uninterrupted study's trial, and the same weights at the end
        assert summary["trials"][number]["params"] == theirs["trials"][number]["params"]
        assert fold_digests(out / f"trial-{number}") == fold_digests(reference / f"trial-{number}")
        assert summary["trials"][number]["value"] == theirs["trials"][number]["value"]


def test_two_workers_started_together_share_the_study_and_never_train_a_trial_twice(digits_root, tmp_path):
    out = tmp_path / "study"
    args = study_args(digits_root, out, **{"cv.folds": 0, "data.val": "val.csv", "train.epochs": 1, "hpo.trials": 4})
    workers = [subprocess.Popen(command("train.py", args), cwd=ROOT, env=run_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-3000:] for _, err in outputs]
    ran = [{int(line.split()[2]) for line in stdout.splitlines() if line.startswith("hpo: trial ") and " of 4)" in line}
           for stdout, _ in outputs]
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == {0, 1, 2, 3}
    summary = summary_of(out)
    assert [(t["number"], t["state"]) for t in summary["trials"]] == [(n, "COMPLETE") for n in range(4)]
    assert all(len(t["workers"]) == 1 for t in summary["trials"]) and len({t["workers"][0] for t in summary["trials"]}) == 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = slurm.Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.mark.skipif(slurm.available() is not None, reason=slurm.available() or "")
def test_a_two_task_slurm_job_array_shares_one_study(cluster, digits_root, tmp_path):
    """launch/README.md's recipe: the same sbatch --array command for every task, no task number in it; the tasks
    (one per node, side by side) claim disjoint trials until the study has hpo.trials. The test holds the study's lock
    until both tasks say they wait for it (a task that starts late on a busy machine would otherwise find the study
    done by the other: correct, but not what is tested)."""
    out = tmp_path / "study"
    env = {**run_env(PATH=f"{BIN}:{os.environ['PATH']}"), "SLURM_CONF": str(cluster.conf), "JOIN_TIMEOUT_S": "120"}
    args = study_args(digits_root, out, **{"cv.folds": 0, "data.val": "val.csv", "train.epochs": 1, "hpo.trials": 4,
                                           "data.num_workers": 0})
    held = RunLock(out, STUDY_LOCK)
    held.acquire()
    try:
        proc = subprocess.run(["sbatch", "--parsable", "--array=0-1", "-N1", f"--output={tmp_path}/task-%a.log",
                               str(ROOT / "launch" / "slurm_train.sbatch"), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
        job = proc.stdout.strip().split(";")[0]
        logs, deadline = [tmp_path / f"task-{task}.log" for task in (0, 1)], time.time() + 240
        while not all(log.exists() and "hpo: waiting for the study's lock" in log.read_text() for log in logs):
            assert time.time() < deadline, [log.read_text()[-2000:] if log.exists() else None for log in logs]
            time.sleep(0.5)
    finally:
        held.release()
    nodes, ran = [], []
    for task in (0, 1):
        info = cluster.wait(f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300)
        log = (tmp_path / f"task-{task}.log").read_text()
        assert info["JobState"] == "COMPLETED", log[-4000:]
        nodes.append(info["NodeList"])
        ran.append({int(line.split()[2]) for line in log.splitlines() if line.startswith("hpo: trial ") and " of 4)" in line})
    assert set(nodes) == {"n1", "n2"}  # side by side, one task per node
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == {0, 1, 2, 3}
    summary = summary_of(out)
    assert [(t["number"], t["state"]) for t in summary["trials"]] == [(n, "COMPLETE") for n in range(4)]
    jobs = [re.search(r"SLURM job (\d+)", t["workers"][0]).group(1) for t in summary["trials"]]
    assert all(len(t["workers"]) == 1 for t in summary["trials"]) and len(set(jobs)) == 2  # each trial by one task
    assert (out / "best.yaml").exists()


def test_a_pruned_trial_stops_at_the_same_fold_on_every_rank(digits_root, tmp_path):
    out = tmp_path / "study"
    # trial 0 learns, trial 1 (a learning rate 10,000 times smaller) does not: after its second fold the signed-rank
    # test (p 0.25 with two folds, both worse) stops it before the third
    args = study_args(digits_root, out, **{"cv.folds": 3, "train.epochs": 1, "hpo.trials": 2, "hpo.pruner": "wilcoxon",
                                           "hpo.prune_p": 0.5, "hpo.space.model.width": "{type: int, low: 8, high: 8}",
                                           "hpo.space.optim.lr": "{type: float, low: 1e-5, high: 1e-1, log: true}",
                                           "hpo.enqueue": "[{optim.lr: 0.05}, {optim.lr: 1e-5}]"})
    proc = run_cli("train.py", args, processes=2, timeout=600)
    first, pruned = summary_of(out)["trials"]
    assert (first["state"], pruned["state"]) == ("COMPLETE", "PRUNED") and pruned["params"] == {"optim.lr": 1e-5, "model.width": 8}
    assert first["stopped_at_per_rank"] == [{"fold": 2, "epoch": None}] * 2
    assert pruned["stopped_at_per_rank"] == [{"fold": 1, "epoch": None}] * 2  # what each rank itself saw
    assert sorted(pruned["reported"]) == ["0", "1"] and not (out / "trial-1" / "fold-2").exists() and pruned["value"] is None
    assert "hpo: trial 1 pruned after fold 1 (2 of 3 folds)" in proc.stdout and "hpo: trial 1: PRUNED" in proc.stdout
    for k in (0, 1):
        assert json.loads((out / "trial-1" / f"fold-{k}" / "run_info.json").read_text())["num_processes"] == 2


def test_a_hold_out_trial_is_pruned_after_an_epoch_by_the_median_rule(digits_root, tmp_path):
    out = tmp_path / "study"
    args = study_args(digits_root, out, **{"cv.folds": 0, "data.val": "val.csv", "train.epochs": 3, "hpo.trials": 2,
                                           "hpo.pruner": "median", "hpo.prune_warmup_epochs": 0, "hpo.prune_startup_trials": 1,
                                           "hpo.space.optim.lr": "{type: float, low: 1e-5, high: 1e-1, log: true}",
                                           "hpo.enqueue": "[{optim.lr: 0.05}, {optim.lr: 1.0e-5}]"})
    proc = run_cli("train.py", args, timeout=300)
    first, pruned = summary_of(out)["trials"]
    assert (first["state"], pruned["state"]) == ("COMPLETE", "PRUNED") and pruned["value"] is None
    assert sorted(first["reported"]) == ["1", "2", "3"] and sorted(pruned["reported"]) == ["1"]
    assert pruned["reported"]["1"] < first["reported"]["1"]
    assert [r["epoch"] for r in read_jsonl(out / "trial-1" / "metrics.jsonl")] == [1]
    assert json.loads((out / "trial-1" / "run_info.json").read_text())["pruned_after_epoch"] == 1
    assert "pruned after epoch 1: the search stops this trial" in proc.stdout


def test_a_failing_trial_is_recorded_with_its_error_and_the_study_goes_on(digits_root, tmp_path):
    out = tmp_path / "study"
    # a NaN loss at step 30 (an epoch is 20 steps): trial 0 (2 epochs) reaches it and stops (train.nonfinite=stop),
    # trial 1 (1 epoch) does not
    args = study_args(digits_root, out, **{"cv.folds": 0, "data.val": "val.csv", "hpo.trials": 2, "train.nonfinite": "stop",
                                           "hpo.space.train.epochs": "{type: int, low: 1, high: 2}",
                                           "hpo.enqueue": "[{train.epochs: 2}, {train.epochs: 1}]"})
    del args[args.index(next(a for a in args if a.startswith("hpo.space.optim.lr=")))]
    del args[args.index(next(a for a in args if a.startswith("hpo.space.model.width=")))]
    proc = run_cli("train.py", args, env={FAULT_ENV: "nan@step:30"}, timeout=300)
    failed, complete = summary_of(out)["trials"]
    assert (failed["state"], complete["state"]) == ("FAIL", "COMPLETE") and failed["value"] is None
    assert failed["error"].startswith("step 30: the loss or gradient is not finite on some rank (train.nonfinite=stop)")
    assert f"hpo: trial 0: FAIL: {failed['error']}" in proc.stdout
    assert summary_of(out)["best"]["number"] == 1 and complete["value"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["hpo.space.optim.lrr={type: float, low: 1e-3, high: 1e-2}"],
     "hpo.space.optim.lrr: low 0.001: unknown config key optim.lrr; did you mean optim.lr?"),
    (["hpo.space.optim.lr={type: float, low: 0, high: 1e-2}"], "hpo.space.optim.lr: low 0.0: optim.lr must be positive"),
    (["hpo.space.model.name={type: categorical, choices: [mlp, resnet19]}"],
     "hpo.space.model.name: choice 'resnet19': model.name: unknown model 'resnet19'; did you mean resnet18?"),
    (["hpo.space.model.width={type: float, low: 4, high: 16}"],
     "hpo.space.model.width: model.width takes whole numbers: use type: int"),
    (["hpo.space.loss.label_smoothing={type: float, low: 0, high: 1}"],
     "hpo.space.loss.label_smoothing: high 1.0: loss.label_smoothing must be in [0, 1)"),
    (["hpo.space.optim.lr={type: flaot, low: 1e-3, high: 1e-2}"],
     "hpo.space.optim.lr.type: 'flaot' is not one of float, int, categorical; did you mean float?"),
    (["hpo.space.optim.lr={type: float, low: 1e-3, high: 1e-2, lg: true}"],
     "unknown config key hpo.space.optim.lr.lg; did you mean hpo.space.optim.lr.log?"),
    (["hpo.space.optim.lr={type: float, low: -1, high: 1e-2, log: true}"], "hpo.space.optim.lr: log needs low > 0 (it is -1.0)"),
    (["hpo.space.optim.lr={type: categorical}"], "hpo.space.optim.lr: type categorical needs choices, e.g. choices: [small_cnn, mlp]"),
    (["hpo.space.cv.folds={type: int, low: 2, high: 5}"],
     "hpo.space.cv.folds: cv.folds cannot be searched (hpo.*, cv.* and output_dir are the study's own)"),
    ([], "hpo.trials=2 needs hpo.space: the config keys to search, e.g. {optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}}"),
    (["hpo.space.optim.lr={type: float, low: 1e-3, high: 1e-2}", "hpo.objective=val_acc"],
     "hpo.objective: unknown metric 'val_acc' for task.kind=classification; did you mean val_accuracy?"),
    (["hpo.space.optim.lr={type: float, low: 1e-3, high: 1e-2}", "hpo.enqueue=[{optim.lr: 0.5}]"],
     "hpo.enqueue[0]: optim.lr=0.5 is outside hpo.space.optim.lr"),
    (["hpo.space.optim.lr={type: float, low: 1e-3, high: 1e-2}", "hpo.pruner=median", "cv.folds=3", "data.val=null"],
     "hpo.pruner=median judges the epochs of a hold-out run; with cv.folds use hpo.pruner=wilcoxon (it judges the folds)"),
    (["hpo.space.optim.lr={type: float, low: 1e-3, high: 1e-2}", "hpo.pruner=wilcoxon"],
     "hpo.pruner=wilcoxon judges a trial between its folds: it needs cv.folds >= 3 (it is 0)"),
])
def test_a_bad_search_space_is_one_line_naming_the_key_before_anything_trains(overrides, message, tmp_path, capsys):
    args = ["--config", config_path("digits.yaml"), f"output_dir={tmp_path / 'study'}", "hpo.trials=2", *overrides]
    with pytest.raises(SystemExit) as exit_info:
        train_main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "study").exists()


def test_a_good_space_loads_from_the_command_line_and_from_yaml(tmp_path):
    dotted = load_config(config_path("digits.yaml"), ["hpo.trials=4", *[f"{k}={v}" for k, v in SPACE.items()],
                                                      "hpo.space.model.name={type: categorical, choices: [small_cnn, mlp]}"])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"hpo": {"trials": 4, "space": {
        "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}, "model.width": {"type": "int", "low": 4, "high": 16},
        "model.name": {"type": "categorical", "choices": ["small_cnn", "mlp"]}}}}))
    assert load_config(path).hpo.space == {k: v for k, v in dotted.hpo.space.items()}
    assert list(dotted.hpo.space) == ["optim.lr", "model.width", "model.name"]
    assert dotted.hpo.space["optim.lr"].log and dotted.hpo.space["model.width"].high == 16


def test_a_running_trial_is_taken_over_only_when_its_worker_is_gone(tmp_path):
    """Study.claim in one process: a RUNNING trial whose lock names a live worker is left to it (a new trial is asked);
    one whose worker has exited is resumed with its own number and parameters; the study ends at hpo.trials."""
    from dist_train.commands.hpo import TRIAL_LOCK, Study

    config = load_config(config_path("digits.yaml"), [f"output_dir={tmp_path}", "hpo.trials=3", *[f"{k}={v}" for k, v in SPACE.items()]])
    first = Study(config).claim()
    assert first["number"] == 0 and "resumed" not in first["line"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def hold(number: int, pid: int) -> None:
            holder = Holder.this_process().__dict__ | {"pid": pid, "pid_started": None}
            (tmp_path / f"trial-{number}" / TRIAL_LOCK).write_text(json.dumps(holder))

        hold(0, live.pid)  # trial 0's worker still runs: another worker leaves it alone
        second = Study(config).claim()
        assert second["number"] == 1 and second["params"] != first["params"]
        hold(0, int(dead.stdout))  # ... and once it is gone, trial 0 is taken over as it was
        hold(1, live.pid)
        third = Study(config).claim()
        assert (third["number"], third["params"]) == (0, first["params"]) and "resumed: its worker is gone" in third["line"]
        hold(0, live.pid)  # (a lock of this very process counts as left behind: the test's workers are other processes)
        assert Study(config).claim()["number"] == 2
        hold(2, live.pid)
        assert Study(config).claim() is None  # three trials exist (all RUNNING): the study is full
    finally:
        live.kill()
        live.wait()
