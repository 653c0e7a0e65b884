"""Training loop, checkpoints, distributed setup, evaluation loop."""
