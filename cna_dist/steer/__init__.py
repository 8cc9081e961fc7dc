"""Steering: a circuit's neurons scaled by m in a running model, prompt and generated tokens alike."""
