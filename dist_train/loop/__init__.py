"""The training loop: from a config to a finished run.

    build.py    the run's Parts, built in named steps (data, model, loss, optimizer, schedule, loaders, guard, EMA)
    engine.py   Run: start, epochs of train + evaluate, the micro-step and optimizer step, save, finish
    state.py    what the loop keeps: RunState (in every checkpoint), an epoch in progress, a micro-batch, an epoch's result
    policy.py   pure rules: when to check, save, evaluate, stop (tested from tables)
    ranks.py    what the ranks agree on and gather (shards, digests, metrics)
    guard.py    non-finite losses and gradients: skip or stop, on all ranks alike
    elastic.py  resuming under another number of processes or batch
    trainer.py  fit(): the accelerator, the locked run directory, the checkpoint to resume, faults handled

May import: every package but commands.
"""
