"""What users run: the command lines, the Python API and the tools around a run.

    cli.py        train.py / predict.py: parse, run, one-line errors and exit codes
    inference.py  sharded prediction gathered into one submission, in the input's order
    cv.py         k-fold cross-validation: folds, out-of-fold predictions, the fold ensemble
    hpo.py        hyper-parameter search (hpo.trials): an Optuna study of trials, shared by workers through a journal
    hpo_report.py what a study leaves: hpo_summary.json, best.yaml, the table, the pictures, TensorBoard's HPARAMS
    debug.py      train.py --debug: one process, a summary and short checks
    export.py     ONNX export checked by onnxruntime
    parity.py     `python -m dist_train.commands.parity`: 2 processes train as 1 does
    api.py        dist_train.Trainer: the loop from Python, with a model, loss or datasets of one's own
    soup.py       dist-train soup: a cross-validation run's folds averaged into one checkpoint
    shards.py     dist-train shards: a split written as a shard set (a directory or s3://)
    scaffold.py   the dist-train command (`new DIR`, `train`, `predict`, `export`, `soup`, `shards`)
    versions.py   --version: one line of versions, from the packages' metadata

May import: every package.
"""
