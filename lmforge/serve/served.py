"""The run ``lmforge serve`` serves: loaded once, what kind of model it is, and what every role
of the server asks of it (its name, context, chat template, tokenizer; the batcher of a decoder)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from lmforge.chat import chat_trained, end_token_id, load_chat_template, render_chat
from lmforge.data.tokenizer import EOT
from lmforge.generate import ContinuousBatcher
from lmforge.serve.common import APIError
from lmforge.serve.logprobs import TokenText
from lmforge.serve.protocol import ChatMessage

DEFAULT_MAX_CONTEXT = 2048  # tokens per sequence when the model's context is longer (serve --max-context)


class ServedRun:
    """The loaded run and, for a decoder, the batcher that generates with it.

    ``kind`` is "generator" (completions and chat), "classifier" (``/v1/classify``) or "encoder"
    (``/v1/embeddings``); ``images`` marks an image classifier (no tokenizer).
    """

    def __init__(self, run_dir: str | Path, max_tokens_cap: int = 1024, max_batch: int = 16, compile: bool = False,
                 max_context: int | None = None):
        from lmforge.runs import load_run

        self.run = load_run(run_dir)
        self.name = Path(run_dir).resolve().name
        self.cap = max_tokens_cap
        self.images = self.run.config.task.name == "image-classify"
        self.eot = self.run.tokenizer.token_to_id(EOT) if self.run.tokenizer is not None else None
        model = self.run.model
        self.kind = ("classifier" if getattr(model.config, "num_labels", 0) else "generator" if model.can_generate
                     else "encoder")
        if self.run.device.type == "cuda" and torch.cuda.is_bf16_supported():
            self.run.model.to(torch.bfloat16)  # serving reads every weight per token: half the bytes
        # The longest prompt + answer served: the model's context, capped so that the batcher's cache
        # (max_batch rows of it, allocated up front) stays small for long-context checkpoints.
        block = getattr(model.config, "block_size", 0)  # image classifiers have no token context
        self.context = min(block, max_context or DEFAULT_MAX_CONTEXT)
        self.batcher = ContinuousBatcher(self.run.model, max_batch, compile, max_len=self.context) \
            if self.kind == "generator" else None
        self.encoder_lock = threading.Lock()  # encoder forwards share the tokenizer's padding state
        self.labels = self.run.labels if self.kind == "classifier" else None
        self.chat_template = load_chat_template(run_dir)
        self.chat_trained = self.kind == "generator" and chat_trained(run_dir)
        # A completion ends at the end of the document; a chat answer at the template's end of turn.
        self.turn_end = end_token_id(self.chat_template, self.run.tokenizer) if self.kind == "generator" else None
        self.created = int(time.time())
        self.token_text = TokenText(self.run.tokenizer) if self.kind == "generator" else None

    def render_chat(self, messages: list[ChatMessage]) -> str:
        return render_chat(self.chat_template, [{"role": "system" if m.role == "developer" else m.role,
                                                 "content": m.text(k)} for k, m in enumerate(messages)])

    def require(self, kind: str, model: str, what: str) -> None:
        """400 unless this server's model is ``model`` and of ``kind`` (it can serve ``what``)."""
        if self.kind != kind:
            article = "an" if self.kind[0] in "aeiou" else "a"
            raise APIError(400, f"{self.name!r} is {article} {self.kind}, not {'an' if kind[0] in 'aeiou' else 'a'} "
                                f"{kind}: it cannot serve {what}", param="model", code="unsupported_model")
        self.require_model(model)

    def require_model(self, model: str) -> None:
        """400 unless ``model`` names this server's model (or is "lmforge")."""
        if model not in (self.name, "lmforge"):
            raise APIError(400, f"unknown model {model!r}; this server serves {self.name!r}", param="model",
                           code="model_not_found")

    def tokenizer(self):
        """The run's tokenizer; 400 for a run without one (an image classifier)."""
        if self.run.tokenizer is None:
            raise APIError(400, f"{self.name!r} is an image classifier: it has no tokenizer", param="model",
                           code="unsupported_model")
        return self.run.tokenizer
