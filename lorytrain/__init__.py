"""lorytrain: the Lory MoE decoder, its baselines, training, evaluation and analysis."""
