"""Loader workers started as dist_train starts them (data.build_loader), for tests/test_workers.py:

    python tests/worker_script.py START lock   # another thread holds a lock the dataset takes, across the fork
    python tests/worker_script.py START sleep  # one batch read, then it waits to be killed

START is data.worker_start. `lock` prints "read" when the first batch arrives, "hung" when none does within 10 s.
`sleep` prints "ready" once its (persistent) workers have delivered a batch.
"""
import sys
import threading
import time

import torch
from torch.utils.data import Dataset

from dist_train.config import DataConfig
from dist_train.data import build_loader

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
    else:
        iterator = iter(loader)
        next(iterator)
        print("ready", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
