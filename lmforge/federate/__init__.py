"""Federated training on Flower: lmforge provides the data partitions (``partition.py``), the
ServerApp and ClientApp (``apps.py``: each client trains a round with the normal trainer) and the
final run directory (``run.py``); Flower does the orchestration."""
