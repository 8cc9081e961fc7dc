"""The pinned ring that carries pipeline rows to the host: a fixed set of buffers, every row filed exactly once.

On the CPU the copies are synchronous, so what is tested here is the bookkeeping (slot reuse, growth, filing
order, flush); benchmarks/gpu_checks.py runs the same ring on CUDA against single-device rows.
"""

from __future__ import annotations

import numpy as np
import torch

from cna_dist.capture.pinned import PinnedRing


def test_rows_land_where_they_belong_through_a_fixed_set_of_buffers() -> None:
    rng = np.random.default_rng(0)
    ring = PinnedRing(slots=3)
    target = np.full((40, 2, 5), np.nan, dtype=np.float32)
    order = rng.permutation(40)
    sizes = [1, 7, 3, 9, 2, 8, 4, 6]  # micro-batches of varying size, as length bucketing makes them
    start, held = 0, []
    for size in sizes:
        index = order[start : start + size]
        values = torch.from_numpy(rng.standard_normal((size, 2, 5)).astype(np.float32))
        ring.put(values, target, index)
        values_copy = values.numpy().copy()
        values.zero_()  # the device tensor is reused at once: the ring must have its own copy
        held.append((index, values_copy))
        assert len(ring.inflight) <= 3
        start += size
    ring.flush()
    assert not ring.inflight and not np.isnan(target).any()
    for index, values in held:
        np.testing.assert_array_equal(target[index], values)
    assert ring.nbytes() <= 3 * 9 * 2 * 5 * 4  # never more than `slots` buffers of the largest micro-batch


def test_a_slot_is_filed_before_it_is_reused() -> None:
    ring = PinnedRing(slots=2)
    target = np.zeros((3, 1), dtype=np.float32)
    for i in range(3):
        ring.put(torch.full((1, 1), float(i + 1)), target, [i])
    assert target[:, 0].tolist() == [1.0, 0.0, 0.0]  # the third put reused slot 0: its copy was filed first
    ring.flush()
    assert target[:, 0].tolist() == [1.0, 2.0, 3.0]
