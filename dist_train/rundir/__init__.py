"""The run directory on disk, and every write into it (rank 0's, atomic).

    checkpoint.py  sealed checkpoints: complete-then-rename, sha256 manifests, rotation, resume
    runlock.py     one run per directory: the lock, taken over from a dead job
    report.py      config.yaml, run_info.json, metrics.jsonl, the console lines (rank 0)
    tracking.py    TensorBoard (and W&B) on the main process
    files.py       whole-file atomic writes
    submission.py  the submission CSV, written atomically

May import: config, errors, custom, job, data, models. Never loop or commands.
"""
