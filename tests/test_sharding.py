"""The sharding layout the loop's loss normalisation relies on, pinned against Accelerate's BatchSamplerShard."""
import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler

from dist_train.engine import expected_batches_per_rank, real_rows, window_sample_count


@pytest.mark.parametrize("n,b,world", [(13, 2, 2), (5, 4, 3), (1257, 32, 2), (9, 2, 3), (64, 8, 2), (3, 4, 2)])
def test_row_positions_and_padding(n, b, world):
    batches = BatchSampler(SequentialSampler(range(n)), b, drop_last=False)
    seen = []
    for rank in range(world):
        shard = list(BatchSamplerShard(batches, world, rank, split_batches=False, even_batches=True))
        assert len(shard) == expected_batches_per_rank(n, b, world)
        for m, batch in enumerate(shard):
            real = real_rows(m, len(batch), rank, world, b, n)
            for j, index in enumerate(batch):
                position = m * world * b + rank * b + j
                if j < real:
                    assert index == position  # the sampler's order, dealt out batch by batch
                    seen.append(index)
                else:
                    assert position >= n  # a repeat that pads the end
    assert sorted(seen) == list(range(n))  # every real sample exactly once over all ranks


@pytest.mark.parametrize("n,b,world,accum", [(1257, 16, 1, 4), (1257, 16, 2, 2), (1257, 32, 2, 1), (5, 4, 3, 2)])
def test_window_counts_add_up_to_the_data_set(n, b, world, accum):
    per_rank = expected_batches_per_rank(n, b, world)
    windows = [window_sample_count(first, min(first + accum, per_rank), world, b, n) for first in range(0, per_rank, accum)]
    assert sum(windows) == n
    assert all(w == world * b * accum for w in windows[:-1])
