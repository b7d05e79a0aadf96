"""The job: the processes and what happens to them, below everything that trains.

    distributed.py  the Accelerator (DDP on NCCL/gloo, DeepSpeed ZeRO, CPU), seeding, agreement between ranks
    faults.py       preemption signals, hung or failing ranks (the watchdog), dying launchers; test fault injection
    layout.py       processes x batch x accumulation: global batch, steps per epoch, each formula once

May import: config, errors. Never data, models, rundir, loop or commands.
"""
