"""The model side, in torch: checkpoints, prompts, batching, capture, steering and generation."""
