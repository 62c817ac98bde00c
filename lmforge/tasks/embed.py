"""Sentence embeddings: fine-tune an encoder (all-MiniLM-L6-v2 by default, or any lmforge or
Hugging Face BERT) on (query, positive) pairs so that a query's embedding lies closest to its own
positive's — contrastive learning with in-batch negatives (the "multiple negatives ranking" loss of
sentence-transformers): in a batch of B pairs, each query's positive is the right answer among
all B positives, and the loss is the cross-entropy of ``scale × cosine`` over them.

Pairs that share a ``group`` (two phrasings of one FAQ entry, an entry's answer and its question
with the answer) are not each other's negatives: in a batch their cross-similarities are masked.

Data: ``.csv``/``.jsonl`` rows with ``query`` and ``positive`` (and optional ``group``) columns.
Validation: a seeded ``val_fraction`` of the groups held out; each held-out query ranks every
held-out positive of another group together with its own, and ``val_top1`` (its own first) and
``val_mrr`` are reported with the loss. The run is an ordinary encoder run: ``lmforge embed``,
``support init --encoder`` and ``classify --init`` use it.

A batch is the queries and the positives together, ``(2B, T)`` token ids: one forward through the
model (and so through DDP) per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.labeled import read_rows
from lmforge.data.tokenizer import encode_batch, load_tokenizer
from lmforge.errors import UserError
from lmforge.tasks.finetune import FineTuneTask, bundled_encoder, load_base


@dataclass
class EmbedOptions:
    name: str = "embed"
    init: str | None = None  # the encoder to fine-tune (default: the bundled all-MiniLM-L6-v2)
    query_column: str = "query"
    positive_column: str = "positive"
    group_column: str = "group"  # optional: pairs of one group are not each other's negatives
    val_fraction: float = 0.15  # without data.val: the share of groups held out
    epochs: int = 1
    max_length: int = 128
    scale: float = 20.0  # the similarity's inverse temperature (sentence-transformers' default)


@dataclass
class Pairs:
    queries: list[str]
    positives: list[str]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.queries)

    def subset(self, keep) -> "Pairs":
        return Pairs([self.queries[i] for i in keep], [self.positives[i] for i in keep], [self.groups[i] for i in keep])


def read_pairs(path: str | Path, query_column: str = "query", positive_column: str = "positive",
               group_column: str = "group") -> Pairs:
    """The (query, positive, group) rows of a ``.csv``/``.jsonl`` file; without a group column each
    row is its own group."""
    path = Path(path)
    columns, rows = read_rows(path, f"a .csv or .jsonl file of {query_column}/{positive_column} pairs")
    missing = [c for c in (query_column, positive_column) if c not in columns]
    if missing:
        raise UserError(f"{path}: no column(s) {', '.join(map(repr, missing))} (columns: {', '.join(map(str, columns))};"
                        " see task.query_column/task.positive_column)")
    out = Pairs([], [], [])
    for n, r in enumerate(rows, 1):
        q, p = r.get(query_column), r.get(positive_column)
        if not isinstance(q, str) or not q.strip() or not isinstance(p, str) or not p.strip():
            raise UserError(f"{path}: row {n} has an empty or missing {query_column!r} or {positive_column!r}")
        group = r.get(group_column)
        out.queries.append(q)
        out.positives.append(p)
        out.groups.append(str(group) if group not in (None, "") else f"row-{n}")
    return out


def split_groups(pairs: Pairs, fraction: float, seed: int = 0) -> tuple[Pairs, Pairs | None]:
    """(training, validation) pairs with a seeded ``fraction`` of the groups held out whole."""
    groups = sorted(set(pairs.groups))
    if fraction <= 0 or len(groups) < 4:
        return pairs, None
    order = np.random.default_rng(seed).permutation(len(groups))
    held = {groups[i] for i in order[:max(2, round(len(groups) * fraction))]}
    return (pairs.subset([i for i, g in enumerate(pairs.groups) if g not in held]),
            pairs.subset([i for i, g in enumerate(pairs.groups) if g in held]))


def contrastive_loss(q: torch.Tensor, p: torch.Tensor, same_group: torch.Tensor, scale: float) -> torch.Tensor:
    """In-batch negatives: (B, C) unit query and positive embeddings; ``same_group`` (B, B) marks
    pairs that may not be each other's negatives (the diagonal is each query's own positive)."""
    logits = scale * (q @ p.t())
    eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
    logits = logits.masked_fill(same_group & ~eye, float("-inf"))
    return F.cross_entropy(logits.float(), torch.arange(len(q), device=q.device))


@torch.no_grad()
def retrieval_figures(model, tokenizer, pairs: Pairs, max_length: int, device, scale: float = 20.0,
                      batch_size: int = 64) -> dict:
    """``loss``, ``top1`` and ``mrr`` of every query ranking the distinct positives of ``pairs``
    (its own and those of other groups; other positives of its group are left out)."""
    from lmforge.embed import embed_texts

    was_training = model.training
    model.eval()
    positives = list(dict.fromkeys(pairs.positives))
    index = {p: j for j, p in enumerate(positives)}
    q = torch.from_numpy(embed_texts(model, tokenizer, pairs.queries, max_length, batch_size))
    p = torch.from_numpy(embed_texts(model, tokenizer, positives, max_length, batch_size))
    model.train(was_training)
    sim = q @ p.t()
    own = torch.tensor([index[x] for x in pairs.positives])
    group_of = {}
    for x, g in zip(pairs.positives, pairs.groups):
        group_of.setdefault(x, g)
    same = torch.tensor([[group_of[x] == g for x in positives] for g in pairs.groups])
    same[torch.arange(len(own)), own] = False
    sim = sim.masked_fill(same, float("-inf"))
    loss = F.cross_entropy(scale * sim, own).item()
    rank = 1 + (sim > sim[torch.arange(len(own)), own].unsqueeze(1)).sum(1)
    return {"loss": loss, "top1": float((rank == 1).float().mean()), "mrr": float((1.0 / rank.float()).mean())}


class EmbedTask(FineTuneTask):
    name = "embed"
    ARCHS = ("bert",)
    Options = EmbedOptions
    METRICS = ("top1", "mrr", "loss")
    method = "sentence_embedding"
    # A pair's loss depends on the other pairs of its batch (they are its negatives): there is no
    # per-example gradient to clip, so DP-SGD's guarantee does not hold.
    supports_dp = False
    # Fine-tuning defaults (flags, the config file and --set override them): sentence-transformers'
    # rate and batch for this loss, every step logged, the best checkpoint by validation top-1.
    DEFAULTS = {"train": dict(lr=2e-5, batch_size=32, max_steps=None, eval_interval=None, log_interval=1,
                              early_stop="top1", keep_best=True, weight_decay=0.01)}
    DATA = "FILE (.csv or .jsonl of query/positive pairs)"

    default_init = staticmethod(bundled_encoder)

    @classmethod
    def validate_options(cls, cfg) -> None:
        super().validate_options(cfg)
        if cfg.task.scale <= 0:
            raise UserError(f"task.scale must be positive, got {cfg.task.scale}")

    def __init__(self, cfg, run=None):
        super().__init__(cfg, run)
        o = cfg.task
        read = lambda p: read_pairs(p, o.query_column, o.positive_column, o.group_column)  # noqa: E731
        pairs = read(cfg.data.path)
        self.train_pairs, self.val_pairs = ((pairs, read(cfg.data.val)) if cfg.data.val is not None
                                            else split_groups(pairs, o.val_fraction))
        if len(self.train_pairs) < 2:
            raise UserError(f"{cfg.data.path}: in-batch negatives need at least two training pairs")
        if self.resume:
            self.base, self.tokenizer = None, None
        else:
            self.base, self.tokenizer = load_base(o.init)
            if not getattr(self.base, "can_embed", False):
                raise UserError(f"--init {o.init}: --task embed fine-tunes an encoder (BERT family)")

    def resolve(self, cfg, world):
        if not self.resume:
            cfg = self.absolute_paths(cfg, max_length=min(cfg.task.max_length, cfg.model.block_size))
        self.plan_epochs(cfg, world, len(self.train_pairs))
        return cfg if self.resume else self.epoch_schedule(cfg)

    def write_files(self, run, model) -> None:
        self.tokenizer.save(str(run.tokenizer))

    def to(self, device):
        super().to(device)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.run.tokenizer)
        n = self.cfg.task.max_length
        self.q_ids, self.q_mask = encode_batch(self.tokenizer, self.train_pairs.queries, n)
        self.p_ids, self.p_mask = encode_batch(self.tokenizer, self.train_pairs.positives, n)
        width = max(self.q_ids.size(1), self.p_ids.size(1))  # one width: a batch stacks queries on positives
        pad = lambda t: F.pad(t, (0, width - t.size(1)))  # noqa: E731  (pad id 0 under a zero mask)
        self.q_ids, self.q_mask, self.p_ids, self.p_mask = map(pad, (self.q_ids, self.q_mask, self.p_ids, self.p_mask))
        codes = {g: k for k, g in enumerate(dict.fromkeys(self.train_pairs.groups))}
        self.group = torch.tensor([codes[g] for g in self.train_pairs.groups])

    def eval_cost(self, cfg) -> float:
        if self.val_pairs is None:
            return 0.0
        return 2 * len(self.val_pairs) / (3 * 2 * self.B * cfg.train.grad_accum)  # forward only: ~1/3 of a step

    def batch(self, step, micro):
        b = self.batch_indices(step, micro)
        width = int(max(self.q_mask[b].sum(1).max(), self.p_mask[b].sum(1).max()))
        ids = torch.cat([self.q_ids[b, :width], self.p_ids[b, :width]])
        mask = torch.cat([self.q_mask[b, :width], self.p_mask[b, :width]])
        g = self.group[b]
        return ids, mask, g.unsqueeze(0) == g.unsqueeze(1)

    def loss(self, call, model, batch):
        ids, mask, same_group = batch
        e = call(ids, mask)
        q, p = e.chunk(2)
        return contrastive_loss(q, p, same_group, self.cfg.task.scale)

    def evaluate(self, model, ctx):
        if self.val_pairs is None:
            return {}
        m = retrieval_figures(model, self.tokenizer, self.val_pairs, self.cfg.task.max_length, self.device,
                              self.cfg.task.scale)
        return {f"val_{k}": v for k, v in m.items()}

    def finish(self, run, model, ctx):
        out = {"arch": self.cfg.arch, "train_pairs": len(self.train_pairs),
               "val_pairs": len(self.val_pairs) if self.val_pairs is not None else 0}
        if self.val_pairs is not None:
            out["validation"] = retrieval_figures(model, self.tokenizer, self.val_pairs, self.cfg.task.max_length,
                                                  self.device, self.cfg.task.scale)
        return out
