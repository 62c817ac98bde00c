"""Instruction tuning (supervised fine-tuning) of a decoder on conversations: ``--task sft``.

Data is JSONL: OpenAI-style ``{"messages": [{"role", "content"}, ...]}`` rows or Alpaca
``{"instruction", "input", "output"}`` rows. Each conversation is rendered with the run's own chat
template (:func:`~lmforge.chat.render_chat`) and only the assistant's tokens — its answer and the
template's end of turn — are targets; the system and user turns are context. Conversations are
packed into rows of ``task.max_length`` tokens; attention stays inside each conversation and its
positions restart at 0 (``segments`` in :meth:`~lmforge.models.decoder.Decoder.forward`), so a
packed row trains what the conversations alone would. A held-out share of the conversations
(``task.val_fraction``) gives the validation loss: the mean over their assistant tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge import config as cfgmod
from lmforge.data.labeled import jsonl_objects, read_utf8
from lmforge.errors import UserError
from lmforge.tasks.finetune import FineTuneTask, load_base

ROLES = ("system", "user", "assistant")


@dataclass
class SFTOptions:
    name: str = "sft"
    init: str | None = None  # the decoder run (or Hugging Face directory) to fine-tune
    val_fraction: float = 0.1  # without data.val: the share of conversations held out
    epochs: int = 3  # the schedule's length when train.max_steps is not given
    max_length: int = 512  # tokens per packed row (at most the model's context)


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSONL file, each a list of ``{"role", "content"}`` with at least one
    assistant message; a bad row is one error line naming it."""
    path = Path(path)
    out = [_conversation(row, f"{path}:{n}") for n, row in jsonl_objects(path, read_utf8(path, "conversations file"))]
    if not out:
        raise UserError(f"{path}: no conversations")
    return out


def _conversation(row, where: str) -> list[dict]:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: message {k} needs a role ({', '.join(ROLES)}) and a string content")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "instruction" in row and "output" in row:
        if not all(isinstance(row.get(k, ""), str) for k in ("instruction", "input", "output", "system")):
            raise UserError(f"{where}: instruction, input and output must be strings")
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + \
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    else:
        raise UserError(f"{where}: expected {{\"messages\": [...]}} or {{\"instruction\", \"input\", \"output\"}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message to learn from")
    return messages


def encode_conversation(template: dict, tokenizer, messages: list[dict],
                        last_only: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and, per token, whether it is the assistant's (a target).

    Assistant message k spans the characters between the prompt for ``messages[:k]`` (which ends
    with the template's opening of an answer) and the rendering of ``messages[:k + 1]``, or its
    template's end-of-turn token (``<|im_end|>``) if that comes first; a token is the assistant's
    when it starts inside such a span (``last_only``: the last assistant message's span only, as
    preference tuning scores a response). A template without an end-of-turn token
    of its own ends each answer with the end-of-text token, which is then a target too.
    """
    from lmforge.chat import end_token_id, render_chat

    text = render_chat(template, messages, generation_prompt=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(template, messages[:k])
        if not text.startswith(prompt):  # the spans assume each prompt renders as the conversation's start
            raise UserError("the chat template does not render a conversation's prompt as the start of the "
                            "conversation; assistant turns cannot be located")
        start = len(prompt)
        stop = len(render_chat(template, messages[:k + 1], generation_prompt=False))
        end = text.find(template["end_token"], start, stop) if template.get("end_token") else -1
        if end >= 0:  # the answer ends with the end-of-turn token; what the template adds after it is context
            stop = end + len(template["end_token"])
        spans.append((start, stop))
    spans = spans[-1:] if last_only else spans
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids, trained = list(enc.ids), [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
    if "jinja" not in template:  # the default template's answers end with the end-of-text token
        end = end_token_id(template, tokenizer)
        if end is not None and messages[-1]["role"] == "assistant":
            ids.append(end)
            trained.append(True)
    return ids, trained


def pack(conversations: list[tuple[list[int], list[bool]]], length: int, alone: bool = False):
    """Conversations packed in order into rows of ``length`` positions: (x, y, segments), each
    (rows, length) int64. A conversation of n tokens fills n - 1 positions (its last token is only
    a target); ``y`` is the next token where that token is a target, else -1; ``segments``
    numbers the conversations (padding is a segment of its own). A conversation longer than a row
    is cut (and left out if no answer token is left). ``alone``: one conversation per row (padded).
    Also returns how many were cut."""
    xs, ys, segs, cut = [], [], [], 0
    x, y, seg, n_seg = [], [], [], 0

    def flush():
        pad = length - len(x)
        xs.append(x + [0] * pad)
        ys.append(y + [-1] * pad)
        segs.append(seg + [n_seg] * pad)
    for ids, trained in conversations:
        if len(ids) > length + 1:
            ids, trained, cut = ids[:length + 1], trained[:length + 1], cut + 1
        if not any(trained[1:]):  # cut before its first answer: nothing to learn from it
            continue
        if x and (alone or len(x) + len(ids) - 1 > length):
            flush()
            x, y, seg = [], [], []
        x += ids[:-1]
        y += [t if m else -1 for t, m in zip(ids[1:], trained[1:])]
        seg += [n_seg] * (len(ids) - 1)
        n_seg += 1
    if x:
        flush()
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long).view(-1, length)  # noqa: E731
    return as_tensor(xs), as_tensor(ys), as_tensor(segs), cut


def load_chat_base(init: str | Path):
    """(model, tokenizer, chat template) of the decoder ``init`` names: a run directory or a Hugging
    Face directory."""
    from lmforge.chat import DEFAULT_CHAT_TEMPLATE, load_chat_template
    from lmforge.interop.hf_dir import hf_chat_template
    from lmforge.runs import RunDir

    model, tokenizer = load_base(init)
    if not model.can_generate or getattr(model.config, "num_labels", 0):
        raise UserError(f"--init {init}: instruction and preference tuning need a decoder (a GPT or Llama run)")
    if RunDir(init).is_run():
        return model, tokenizer, load_chat_template(init)
    return model, tokenizer, hf_chat_template(Path(init)) or DEFAULT_CHAT_TEMPLATE


def encode_all(template: dict, tokenizer, conversations: list[list[dict]]):
    return [encode_conversation(template, tokenizer, m) for m in conversations]


@torch.no_grad()
def assistant_loss(model, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor, device, ctx,
                   batch_size: int = 4) -> tuple[float, int]:
    """(mean loss over the target tokens, their number) of packed rows, ``batch_size`` rows at a time."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for s in range(0, x.size(0), batch_size):
        xb, yb, sb = (t[s:s + batch_size].to(device) for t in (x, y, segments))
        with ctx:
            logits, _ = model(xb, segments=sb)
        total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), yb.view(-1), ignore_index=-1,
                                 reduction="sum").item()
        count += int((yb >= 0).sum())
    model.train(was_training)
    return (total / count if count else math.nan), count


def conversations_loss(run, conversations: list[list[dict]], batch_size: int = 8) -> dict:
    """A decoder run on ``conversations``: the mean loss over their assistant tokens (what SFT
    lowers), with the counts (``lmforge eval --task sft``)."""
    from lmforge.chat import load_chat_template
    from lmforge.device import autocast_for

    encoded = encode_all(load_chat_template(run.path), run.tokenizer, conversations)
    length = min(run.model.config.block_size, 1024)
    x, y, segments, cut = pack(encoded, length)
    loss, tokens = assistant_loss(run.model, x, y, segments, run.device, autocast_for(run.device, "auto"), batch_size)
    return {"val_loss": loss, "val_ppl": math.exp(loss) if loss < 50 else None, "conversations": len(conversations),
            "assistant_tokens": tokens, "cut_conversations": cut, "length": length}


def per_row_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean over rows of each row's mean loss over its targets (``y`` >= 0): logits (B, T, V),
    y (B, T). Each row's gradient is then its own (DP-SGD clips it), whatever the others hold."""
    per_token = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")  # (B, T)
    return (per_token.sum(1) / (y >= 0).sum(1).clamp(min=1)).mean()


class SFTTask(FineTuneTask):
    name = "sft"
    ARCHS = ("gpt", "llama")  # the family of --init
    Options = SFTOptions
    unit = "tokens"
    # Fine-tuning defaults (flags, the config file and --set override them): a small rate, the
    # schedule from the epochs, every step logged, one evaluation per epoch, the best checkpoint
    # by validation loss.
    DEFAULTS = {"train": dict(lr=2e-5, batch_size=4, max_steps=None, eval_interval=None, log_interval=1,
                              warmup_steps=10, early_stop="loss", keep_best=True)}

    DATA = "FILE.jsonl (conversations)"
    # With train.dp, DP-SGD's examples are the conversations: one per row, each row's loss the mean
    # over its own assistant tokens (another row's length must not weigh its gradient).

    def __init__(self, cfg, run=None):
        from lmforge.chat import load_chat_template
        from lmforge.data.tokenizer import load_tokenizer

        super().__init__(cfg, run)
        train_c, val_c = self.train_and_val(read_conversations)
        if self.resume:  # the model is the checkpoint's; tokenizer and template are the run's own
            self.base, self.tokenizer, self.template = None, load_tokenizer(run.tokenizer), load_chat_template(run.path)
        else:
            self.base, self.tokenizer, self.template = load_chat_base(cfg.task.init)
        self.train_enc = encode_all(self.template, self.tokenizer, train_c)
        self.val_enc = encode_all(self.template, self.tokenizer, val_c) if val_c else None
        self.n_conversations = (len(train_c), len(val_c) if val_c else 0)

    def resolve(self, cfg, world):
        if not self.resume:
            cfg = self.absolute_paths(cfg, max_length=min(cfg.task.max_length, cfg.model.block_size))
        length = cfg.task.max_length
        self.private = cfg.train.dp.epsilon is not None
        self.x, self.y, self.segments, self.cut = pack(self.train_enc, length, alone=self.private)
        if not len(self.x):
            raise UserError(f"{cfg.data.path}: no conversation has an assistant token within {length} tokens")
        self.val = pack(self.val_enc, length)[:3] if self.val_enc else None
        self.plan_epochs(cfg, world, len(self.x))
        return cfg if self.resume else self.epoch_schedule(cfg)

    def write_files(self, run, model) -> None:
        from lmforge.chat import save_chat_template

        self.tokenizer.save(str(run.tokenizer))
        save_chat_template(run.path, self.template)

    def to(self, device):
        super().to(device)
        # train.dp: the head must run as a module on (B, T, C) for Opacus to see each example's part.
        self.loss_chunk = 0 if self.private else cfgmod.loss_chunk_for(self.cfg.train.loss_chunk, device.type)

    def units_per_step(self, cfg, world) -> int:
        return self.B * cfg.task.max_length * cfg.train.grad_accum * world.size

    def eval_cost(self, cfg) -> float:
        return 0.0 if self.val is None else len(self.val[0]) / (3 * self.B * cfg.train.grad_accum)

    def batch(self, step, micro):
        b = self.batch_indices(step, micro)
        return self.x[b], self.y[b], self.segments[b]

    def loss(self, call, model, batch):
        x, y, segments = batch
        if self.private:  # one conversation per row, right-padded: causal attention needs no segments
            return per_row_loss(call(x)[0], y)
        _, loss = call(x, y, segments=segments, loss_chunk=self.loss_chunk)
        return loss

    def evaluate(self, model, ctx):
        if self.val is None:
            return {}
        loss, _ = assistant_loss(model, *self.val, self.device, ctx, self.B)
        return {"val_loss": loss}

    def finish(self, run, model, ctx):
        out = {"arch": self.cfg.arch, "train_conversations": self.n_conversations[0],
               "val_conversations": self.n_conversations[1], "train_rows": len(self.x), "cut_conversations": self.cut}
        if self.val is not None:
            out["val_loss"], out["val_assistant_tokens"] = assistant_loss(model, *self.val, self.device, ctx, self.B)
        return out
