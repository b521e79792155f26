"""Training: the run itself (run.py: build, then `Training` epoch by epoch), the epoch loop and
evaluation (loop.py), optimizer/schedule/loss from the recipe (optim.py), checkpoints, exact
resume and the one weights reader (checkpoint.py), DDP set-up (distributed.py), what a run
records in its directory (record.py; the layout is repro.rundir's), and the commands that reuse
the trainer's own model, data and steps: `repro eval` (evaluate.py), `repro profile`
(profile.py)."""
