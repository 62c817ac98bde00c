"""lmforge merge-lora: fold a LoRA run's adapters into its weights (a plain run of the same family)."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import emit
from lmforge.cli.options import flag


@dataclass
class MergeOptions:
    run_dir: str = flag(positional=True, help="a run trained with --set finetune.lora.r=R")
    out: str = flag(None, required=True, help="run directory to write (the merged model)")
    json: bool = flag(False)


def run_merge(o: MergeOptions) -> int:
    """Write RUN_DIR's model with every adapter folded into its layer (W + alpha/r B A): the same
    outputs, no adapter cost when serving, and a run every other command takes as it takes any."""
    from lmforge.models.lora import merge_run

    return emit(o.json, merge_run(o.run_dir, o.out), lambda info: (
        f"merged {info['merged_layers']} LoRA layers of {o.run_dir} -> {info['run_dir']} ({info['params']:,} params)"))


VERB_SPECS = {"merge-lora": (MergeOptions, run_merge, "fold a LoRA run's adapters into its weights")}
