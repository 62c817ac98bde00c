"""Training: one loop (trainer.py), optimizer and schedule (optim.py), checkpoints (checkpoint.py)."""
