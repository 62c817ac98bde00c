"""Evaluation: language-model metrics (lm.py) and run reports with plots (report.py)."""
