"""Cluster launch helpers (the Slurm scripts in ``slurm/`` call ``launch.slurm``)."""
