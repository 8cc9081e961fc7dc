"""The CNA math in plain numpy: means, top-k, universal counts, selection, metrics, circuit diffs. No torch, no I/O."""
