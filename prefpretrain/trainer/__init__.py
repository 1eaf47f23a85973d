"""Model, objectives, DeepSpeed engine, training loop, checkpoints, evaluation, monitoring."""
