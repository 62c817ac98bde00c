"""Preference tuning with DPO (Rafailov et al., 2023): ``--task dpo``.

Data is JSONL rows ``{"prompt", "chosen", "rejected"}``; the prompt is a user message (a string)
or a list of messages; each response is rendered as the assistant's answer with the run's chat
template and scored by the sum of its tokens' log-probabilities (those of the answer and its end
of turn, as in SFT). The reference is the initial weights (``--init``): its scores are computed
once, before training, so no second model is held while training and ``--resume`` recomputes the
same ones. The loss is ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` (policy and reference
scores of the chosen and rejected responses); on held-out pairs the task reports the loss, the
reward accuracy (how often the implicit reward ``beta * (policy - reference)`` of the chosen
response is higher) and the mean reward margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.labeled import jsonl_objects, read_utf8
from lmforge.errors import UserError
from lmforge.tasks.finetune import FineTuneTask
from lmforge.tasks.sft import ROLES, encode_conversation, load_chat_base


@dataclass
class DPOOptions:
    name: str = "dpo"
    init: str | None = None  # the decoder run (or Hugging Face directory): the start and the reference
    val_fraction: float = 0.1  # without data.val: the share of pairs held out
    epochs: int = 3
    max_length: int = 256  # tokens per prompt + response (longer ones are cut)
    beta: float = 0.1  # how far the policy may move from the reference


def read_pairs(path: str | Path) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, chosen, rejected) of each JSONL row; a bad row is one error line."""
    path = Path(path)
    pairs = []
    for n, row in jsonl_objects(path, read_utf8(path, "preference pairs file")):
        if not all(isinstance(row.get(k), str) for k in ("chosen", "rejected")):
            raise UserError(f"{path}:{n}: expected {{\"prompt\", \"chosen\", \"rejected\"}} with string responses")
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in prompt):
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        else:
            raise UserError(f"{path}:{n}: 'prompt' must be a string or a list of messages with a role and content")
        pairs.append((messages, row["chosen"], row["rejected"]))
    if not pairs:
        raise UserError(f"{path}: no preference pairs")
    return pairs


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """(mean loss, chosen rewards, rejected rewards) from per-pair summed log-probabilities."""
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen, rejected


def padded(encoded: list[tuple[list[int], list[bool]]], length: int):
    """(x, y) (N, length) of responses: inputs and next-token targets where the target is scored."""
    x = torch.zeros(len(encoded), length, dtype=torch.long)
    y = torch.full((len(encoded), length), -1, dtype=torch.long)
    for i, (ids, scored) in enumerate(encoded):
        ids, scored = ids[:length + 1], scored[:length + 1]
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], scored[1:])])
    return x, y


def sequence_logp(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of the log-probabilities of the scored targets (y >= 0): (N,)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (logp * (y >= 0)).sum(-1)


class DPOTask(FineTuneTask):
    name = "dpo"
    ARCHS = ("gpt", "llama")
    Options = DPOOptions
    DATA = "FILE.jsonl (preference pairs)"
    # A pair is two rows of the batch (chosen, rejected): Opacus would clip each row, not each pair.
    supports_dp = False
    METRICS = ("loss", "reward_accuracy", "reward_margin")
    DEFAULTS = {"train": dict(lr=5e-6, batch_size=4, max_steps=None, eval_interval=None, log_interval=1,
                              warmup_steps=10, early_stop="loss", keep_best=True)}

    @classmethod
    def validate_options(cls, cfg) -> None:
        super().validate_options(cfg)
        if not cfg.task.beta > 0:
            raise UserError(f"task.beta must be positive, got {cfg.task.beta}")

    def __init__(self, cfg, run=None):
        super().__init__(cfg, run)
        self.pairs, self.val_pairs = self.train_and_val(read_pairs)
        # The initial weights are the reference, on --resume too (their scores are recomputed).
        self.base, self.tokenizer, self.template = load_chat_base(cfg.task.init)

    def _encode(self, pairs, length):
        def responses(k):
            return [encode_conversation(self.template, self.tokenizer, m + [{"role": "assistant", "content": p[k]}],
                                        last_only=True) for m, *p in pairs]
        return padded(responses(0), length) + padded(responses(1), length)  # chosen x, y, rejected x, y

    def resolve(self, cfg, world):
        if not self.resume:
            cfg = self.absolute_paths(cfg, max_length=min(cfg.task.max_length, cfg.model.block_size))
        length = cfg.task.max_length
        self.train = self._encode(self.pairs, length)
        self.val = self._encode(self.val_pairs, length) if self.val_pairs else None
        self.plan_epochs(cfg, world, len(self.pairs))
        return cfg if self.resume else self.epoch_schedule(cfg)

    def write_files(self, run, model) -> None:
        from lmforge.chat import save_chat_template

        self.tokenizer.save(str(run.tokenizer))
        save_chat_template(run.path, self.template)

    @torch.no_grad()
    def _scores(self, model, data, batch_size: int = 8):
        """Summed log-probabilities of the chosen and of the rejected responses, (N,) each."""
        was_training = model.training
        model.eval()
        out = []
        for x, y in ((data[0], data[1]), (data[2], data[3])):
            out.append(torch.cat([sequence_logp(model(x[s:s + batch_size].to(self.device))[0],
                                                y[s:s + batch_size].to(self.device)).cpu()
                                  for s in range(0, len(x), batch_size)]))
        model.train(was_training)
        return out

    def to(self, device):
        super().to(device)
        reference = self.base.to(device)
        self.ref_train = self._scores(reference, self.train)
        self.ref_val = self._scores(reference, self.val) if self.val is not None else None
        self.base = None  # the reference's scores are all that is needed of it

    def units_per_step(self, cfg, world) -> int:
        return self.B * cfg.train.grad_accum * world.size

    def eval_cost(self, cfg) -> float:
        return 0.0 if self.val is None else 2 * len(self.val[0]) / (3 * self.B * cfg.train.grad_accum)

    def batch(self, step, micro):
        b = self.batch_indices(step, micro)
        cx, cy, rx, ry = (t[b] for t in self.train)
        return torch.cat([cx, rx]), torch.cat([cy, ry]), self.ref_train[0][b], self.ref_train[1][b]

    def loss(self, call, model, batch):
        x, y, ref_chosen, ref_rejected = batch
        logits, _ = call(x)
        logp = sequence_logp(logits, y)
        n = len(ref_chosen)
        return dpo_loss(logp[:n], logp[n:], ref_chosen, ref_rejected, self.cfg.task.beta)[0]

    def evaluate(self, model, ctx):
        if self.val is None:
            return {}
        with ctx:
            chosen, rejected = self._scores(model, self.val)
        loss, rc, rr = dpo_loss(chosen, rejected, *self.ref_val, self.cfg.task.beta)
        return {"val_loss": loss.item(), "val_reward_accuracy": (rc > rr).float().mean().item(),
                "val_reward_margin": (rc - rr).mean().item()}

    def finish(self, run, model, ctx):
        return {"arch": self.cfg.arch, "train_pairs": len(self.pairs),
                "val_pairs": len(self.val_pairs) if self.val_pairs else 0, **self.evaluate(model, ctx)}
