"""Making a trained run smaller and faster, and saying what it cost (``lmforge compress``).

``quantize.py``: int8 weights for every Linear layer (PyTorch's dynamic int8 kernels on the CPU),
stored in safetensors as plain int8 + per-channel scales; ``prune.py``: structured pruning of MLP
neurons, the layers rebuilt at the smaller shape; ``report.py``: the original and the compressed run
side by side — size, memory, latency, throughput and the task's quality metric.
"""
