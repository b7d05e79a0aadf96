"""The run directory on disk, and every write into it (rank 0's, atomic).

    checkpoint.py  sealed checkpoints: complete-then-rename, sha256 manifests, rotation, resume
    weights.py     a model's weights whole on every rank (ZeRO-3 gathered); digests of states
    runlock.py     one run per directory: the lock, taken over from a dead job
    report.py      config.yaml, run_info.json, metrics.jsonl, the console lines (rank 0)
    tracking.py    TensorBoard (and W&B, MLflow, Accelerate's others) on the main process
    mlflow_runs.py MLflow: one run per run directory, nested under its cross-validation's or study's
    logged.py      what a killed run's trackers hold from its checkpoint on: a resume logs each value once
    files.py       whole-file atomic writes
    submission.py  the submission CSV, written atomically

May import: config, errors, custom, job, data, models. Never loop or commands.
"""
