"""Loader workers started as dist_train starts them (data.build_loader), for tests/test_workers.py:

    python tests/worker_script.py START lock   # another thread holds a lock the dataset takes, across the fork
    python tests/worker_script.py START sleep  # one batch read, then it waits to be killed
    python tests/worker_script.py START signal # one batch read, then SIGTERM and SIGUSR1 to its process group

START is data.worker_start. `lock` prints "read" when the first batch arrives, "hung" when none does within 10 s.
`sleep` prints "ready" once its (persistent) workers have delivered a batch. `signal` prints "ready" too, waits
for both signals (as a rank notes them, to act at its next step) and then reads on: "read N more" (N: the epoch's
other batch and a whole second one, 3) -- a loader whose workers or server the signals killed raises instead.
"""
import signal
import sys
import threading
import time

import torch
from torch.utils.data import Dataset

from dist_train.config import DataConfig
from dist_train.data.loaders import build_loader

LOCK = threading.Lock()  # a stand-in for a glibc lock another thread of a rank may hold when workers fork


class LockingDataset(Dataset):
    """Defined in the script run, as a user's own dataset would be: the fork server must import it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        with LOCK:
            return torch.full((1,), float(index)), index


def main(start: str, mode: str) -> None:
    loader = build_loader(LockingDataset(), DataConfig(num_workers=2, worker_start=start, batch_size=4), train=False, seed=0)
    if mode == "lock":
        held = threading.Event()
        threading.Thread(target=lambda: (LOCK.acquire(), held.set(), time.sleep(600)), daemon=True).start()
        held.wait()
        loader.timeout = 10
        try:
            next(iter(loader))
            print("read", flush=True)
        except RuntimeError:  # "DataLoader timed out after 10 seconds"
            print("hung", flush=True)
    elif mode == "sleep":
        iterator = iter(loader)
        next(iterator)
        print("ready", flush=True)
        time.sleep(600)
    else:
        received = set()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: received.add(signum))
        iterator = iter(loader)
        next(iterator)
        print("ready", flush=True)
        deadline = time.time() + 60
        while len(received) < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # what the signals kill is gone by now
        print(f"read {sum(1 for _ in iterator) + sum(1 for _ in loader)} more", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
