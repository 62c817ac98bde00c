"""Where a run's logged scalars go: ``metrics.jsonl`` (one JSON object per line, always) and, with
``train.tensorboard``, TensorBoard event files in the run directory (the writer of the
``tensorboard`` package, through ``torch.utils.tensorboard``), as Hugging Face and LitGPT do.

Tags: a record's ``val_<name>`` figures go under ``val/<name>``, the rest under ``train/<name>``;
the step is the record's ``step``.
"""

from __future__ import annotations

import json
from pathlib import Path

SKIP = ("step",)


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # the tensorboard package is missing
                from lmforge.errors import UserError

                raise UserError(f"train.tensorboard needs the tensorboard package ({e})") from None
            self.writer = SummaryWriter(log_dir=str(run_dir))

    def truncate(self, step: int) -> None:
        """Drop the lines after checkpoint ``step`` (a resume logs those steps again) and a line a
        kill tore, keeping every complete line up to ``step``."""
        if not self.enabled or not self.path.is_file():
            return
        from lmforge.fsutil import write_text

        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line + "\n")
        write_text(self.path, "".join(kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key in SKIP or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
