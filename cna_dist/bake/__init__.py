"""Baking a circuit into a checkpoint: each circuit neuron's down-projection column multiplied by M, once, in the
weights, so that any engine serves the steered model with no hooks."""
