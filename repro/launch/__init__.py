"""Launching recipes: a plan (what will run, with derived values), local and Slurm execution."""
