"""Stage 2, models: the architecture registry, checkpoints (untrusted files) and layer cuts."""
