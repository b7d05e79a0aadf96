"""How often loader workers hang when another thread of the process holds glibc's locks as they start.

    python bench/worker_start_hazard.py --start fork --loaders 100
    python bench/worker_start_hazard.py --start forkserver --loaders 100

A thread churns the dynamic loader (dlopen/dlclose of a small system library: the loader lock and the
exit-handler lock, the locks a first-time C++ static or thread-local takes), as gloo's threads or the watchdog
may at any moment in a rank; the main thread starts `--loaders` loaders of dist_train (data.build_loader, the
digits, 2 workers each) and counts the ones whose first batch does not come within 5 s. Results: BENCHMARKS.md.
"""
import argparse
import csv
import ctypes
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_train.config import load_config  # noqa: E402
from dist_train.data.datasets import build_dataset  # noqa: E402
from dist_train.data.loaders import build_loader  # noqa: E402
from dist_train.data.digits import materialize_digits  # noqa: E402
from dist_train.data.tables import Records  # noqa: E402
from dist_train.data.workers import prestart_worker_server  # noqa: E402

LIBRARY = b"libBrokenLocale.so.1"  # glibc's smallest: loaded and unloaded for real each time


def churn_loader_lock() -> None:
    libc = ctypes.CDLL(None)
    libc.dlopen.restype, libc.dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    libc.dlclose.argtypes = [ctypes.c_void_p]
    if not libc.dlopen(LIBRARY, 2):
        sys.exit(f"cannot load {LIBRARY.decode()}")
    while True:
        libc.dlclose(libc.dlopen(LIBRARY, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", choices=["fork", "forkserver"], required=True)
    parser.add_argument("--loaders", type=int, default=100)
    parser.add_argument("--prestart", action="store_true",
                        help="start the fork server before the churning thread, as a rank does at config load (the "
                             "server is then a fork of this one-threaded process); without it the server starts with "
                             "the thread running (CPython's own start: a fresh interpreter)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp()) / "digits"
    materialize_digits(root)
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"), [
        f"data.root={root}", "data.image_size=8", "data.num_workers=2", "data.persistent_workers=false",
        "data.train_augment=[{name: RandomAffine, degrees: 10, translate: [0.1, 0.1]}]", f"data.worker_start={args.start}"]).data
    rows = list(csv.DictReader(open(root / "train.csv")))[:256]
    records = Records([root / r["image"] for r in rows], [int(r["label"]) for r in rows], [r["id"] for r in rows])
    if args.prestart:
        prestart_worker_server(cfg)
    threading.Thread(target=churn_loader_lock, daemon=True).start()
    hung, started = 0, time.perf_counter()
    for i in range(args.loaders):
        loader = build_loader(build_dataset(records, cfg, "train", i), cfg, train=True, seed=i)
        loader.timeout = 5
        iterator = iter(loader)
        try:
            next(iterator)
        except RuntimeError:  # "DataLoader timed out after 5 seconds"
            hung += 1
            for worker in iterator._workers:
                worker.kill()
        del iterator, loader
    first = " (server started before the thread)" if args.prestart else ""
    print(f"worker_start={args.start}{first}: {hung} of {args.loaders} loader starts hung "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    os._exit(0)  # the churning thread is inside libc


if __name__ == "__main__":
    main()
