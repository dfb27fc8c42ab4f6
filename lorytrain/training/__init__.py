"""`lory train`: config, trainer loop, checkpoints, metrics and data/model parallelism."""
