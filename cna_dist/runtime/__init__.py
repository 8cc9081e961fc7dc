"""The distributed shell: executors, the replica pool, the retrying scheduler and the replica itself."""
