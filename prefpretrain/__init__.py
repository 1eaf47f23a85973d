"""prefpretrain: pretraining language models with human preferences, from a laptop CPU to SLURM."""

__version__ = "0.1.0"
