"""Tasks: what is learned, plugged into the one training loop (``tasks/base.py`` says how).

``TASKS`` is the table of tasks: a new task is one file here plus one row.
"""

from __future__ import annotations

from lmforge.tasks.base import Task
from lmforge.tasks.classify import ClassifyTask
from lmforge.tasks.dpo import DPOTask
from lmforge.tasks.embed import EmbedTask
from lmforge.tasks.gan import GANTask
from lmforge.tasks.images import ImageClassifyTask
from lmforge.tasks.lm import LMTask
from lmforge.tasks.mlm import MLMTask
from lmforge.tasks.sft import SFTTask

TASKS: dict[str, type[Task]] = {"lm": LMTask, "mlm": MLMTask, "classify": ClassifyTask,
                                "image-classify": ImageClassifyTask, "sft": SFTTask,
                                "dpo": DPOTask, "gan": GANTask, "embed": EmbedTask}


def task_for(model) -> str:
    """The task a model was made for, when nothing else says (an imported checkpoint)."""
    if getattr(model, "can_sample_images", False):
        return "gan"
    if hasattr(model.config, "in_channels"):
        return "image-classify"
    if getattr(model.config, "num_labels", 0):
        return "classify"
    return "lm" if model.can_generate else "mlm"
