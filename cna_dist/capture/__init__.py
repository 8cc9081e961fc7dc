"""Capture: the one stage forward and the engines that run it (single, device_map, pipeline, stream), rows out."""
