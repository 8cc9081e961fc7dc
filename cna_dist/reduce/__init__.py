"""The reduce: the CNA math in numpy (means, delta, universal counts, top-k) and its streamed run over a store."""
