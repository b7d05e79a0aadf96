"""How an epoch is cut over processes, micro-batches and accumulation windows: every such formula, once."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Layout:
    """`processes` x `batch_size` (per process) x `accum` micro-batches = one optimizer step's global batch.

    Accelerate deals the sampler's batches out round-robin (batch k to rank k % processes) and completes
    the last ones with indices from the epoch's start, so row j of micro-batch m on rank r sits at position
    m * processes * batch_size + r * batch_size + j of the epoch's sample order, and is a real sample iff
    that position is < `samples` (tests/test_sharding.py pins this against Accelerate's BatchSamplerShard).
    Plain integers: no device work, no host sync.
    """

    processes: int
    batch_size: int
    accum: int
    samples: int = 0
    """Training samples in an epoch (0 until the data is known)."""

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes * self.accum

    def with_samples(self, samples: int) -> Layout:
        return replace(self, samples=samples)

    def as_list(self) -> list[int]:
        """[processes, per-process batch, accumulation]: what a checkpoint records (a mid-epoch position only
        means the same samples under the same three)."""
        return [self.processes, self.batch_size, self.accum]

    @property
    def batches_per_process(self) -> int:
        """Micro-batches each process takes per epoch (the last ones padded with repeats)."""
        return math.ceil(math.ceil(self.samples / self.batch_size) / self.processes)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: Accelerate also syncs at the end of the loader, so a last short window is
        one more step."""
        return math.ceil(self.batches_per_process / self.accum)

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        total = self.steps_per_epoch * epochs
        return total if max_steps is None else min(total, max_steps)

    def real_rows(self, micro_batch: int, batch_len: int, rank: int) -> int:
        """How many leading rows of rank `rank`'s micro-batch `micro_batch` are real samples; the rest pad the epoch."""
        start = micro_batch * self.processes * self.batch_size + rank * self.batch_size
        return max(0, min(batch_len, self.samples - start))

    def window(self, micro_batch: int) -> tuple[int, int]:
        """The accumulation window [first, end) of micro-batches holding `micro_batch` (one optimizer step)."""
        first = micro_batch - micro_batch % self.accum
        return first, min(first + self.accum, self.batches_per_process)

    def window_samples(self, micro_batch: int) -> int:
        """Real samples, over all processes, in the window of `micro_batch`: one optimizer step's batch."""
        first, end = self.window(micro_batch)
        per_micro = self.processes * self.batch_size
        return min(self.samples, end * per_micro) - min(self.samples, first * per_micro)
