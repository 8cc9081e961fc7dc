"""Circuits: the circuit file (`cna-circuit/1`), the registry of immutable versions, diffs between circuits."""
