"""The sharding layout the loop's loss normalisation relies on, pinned against Accelerate's BatchSamplerShard."""
import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler

from dist_train.job.layout import Layout


@pytest.mark.parametrize("n,b,world", [(13, 2, 2), (5, 4, 3), (1257, 32, 2), (9, 2, 3), (64, 8, 2), (3, 4, 2)])
def test_row_positions_and_padding(n, b, world):
    layout = Layout(world, b, 1, n)
    batches = BatchSampler(SequentialSampler(range(n)), b, drop_last=False)
    seen = []
    for rank in range(world):
        shard = list(BatchSamplerShard(batches, world, rank, split_batches=False, even_batches=True))
        assert len(shard) == layout.batches_per_process
        for m, batch in enumerate(shard):
            real = layout.real_rows(m, len(batch), rank)
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
    layout = Layout(world, b, accum, n)
    firsts = range(0, layout.batches_per_process, accum)
    windows = [layout.window_samples(first) for first in firsts]
    assert sum(windows) == n
    assert all(w == world * b * accum for w in windows[:-1])
    assert len(windows) == layout.steps_per_epoch
    # every micro-batch of a window reports its window's count
    assert all(layout.window_samples(m) == windows[m // accum] for m in range(layout.batches_per_process))
    assert layout.global_batch == world * b * accum
