"""Starting ranks: one process, torchrun on one machine, (later) multi-node and SLURM."""
