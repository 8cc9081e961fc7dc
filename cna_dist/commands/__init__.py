"""What each CLI command does (mine, eval, nightly, inspect, demo); `cna_dist.cli` only wires options to them."""
