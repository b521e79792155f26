"""Training: the epoch loop and evaluation (loop.py), optimizer/schedule/loss from the recipe
(optim.py), atomic checkpoints with exact resume (checkpoint.py), DDP set-up (distributed.py),
metrics and the run directory (rundir.py), and the run itself (run.py)."""
