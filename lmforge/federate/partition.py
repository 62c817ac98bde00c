"""Who holds which examples in a federated run: the pooled data and its split into clients —
image data (:class:`Federation`) or token data for ``--task lm`` (:class:`TokenFederation`).

``iid``: a seeded shuffle cut into near-equal parts. ``dirichlet:ALPHA``: label skew as in Hsu et
al. (2019) — for each class, the shares of the clients are drawn from Dirichlet(ALPHA) and the
class's examples are dealt out by them (small ALPHA: each client sees few classes; large: close to
iid); drawn again (seeded) until every client holds at least ``MIN_EXAMPLES``. ``by-file``: each
``--data`` directory is one client's data, as it would be at separate sites.

Each client's part is written as an ordinary ``prepare --kind images`` directory (training split
only) that carries the federation's normalisation, so every client builds the same model and its
training is the normal trainer's on ordinary data.

A labelled text file (``--task classify``) is split as the classify task splits it (the
stratified validation share, seed 0, is the server's), and its training rows are dealt out as
images are; each client's part is a JSONL file of those rows.

Token data has no labels to skew: ``iid`` deals the training text's windows (``block_size`` tokens
each, seeded) out to the clients, ``by-file`` takes each ``prepare`` directory (one tokenizer for
all) as one site's; a client's part is an ordinary ``prepare`` directory whose ``train.bin`` holds
its windows.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.images import SPLITS, ImageData
from lmforge.data.tokens import TokenFile, load_meta
from lmforge.errors import UserError
from lmforge.fsutil import write_json

MIN_EXAMPLES = 8  # fewest training examples a client may hold
DRAWS = 100  # Dirichlet draws tried before giving up on MIN_EXAMPLES


def parse_scheme(spec: str) -> tuple[str, float | None]:
    """``iid`` | ``dirichlet:ALPHA`` | ``by-file`` -> (name, alpha)."""
    if spec in ("iid", "by-file"):
        return spec, None
    name, _, alpha = spec.partition(":")
    if name == "dirichlet":
        try:
            value = float(alpha)
        except ValueError:
            value = 0.0
        if value > 0:
            return name, value
        raise UserError(f"--partition dirichlet:ALPHA needs a positive ALPHA (e.g. dirichlet:0.5), got {spec!r}")
    raise UserError(f"--partition takes iid, dirichlet:ALPHA or by-file, not {spec!r}")


def split_clients(y: np.ndarray, clients: int, scheme: str, alpha: float | None, seed: int) -> list[np.ndarray]:
    """Training-example indices of each client (sorted), under ``iid`` or ``dirichlet``."""
    n, rng = len(y), np.random.default_rng([seed, 29])
    if n < clients * MIN_EXAMPLES:
        raise UserError(f"{n} training examples cannot give {clients} clients {MIN_EXAMPLES} each")
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    for _ in range(DRAWS):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for k in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == k))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for c, chunk in enumerate(np.split(members, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_EXAMPLES:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise UserError(f"dirichlet:{alpha} left a client with fewer than {MIN_EXAMPLES} examples in {DRAWS} draws; "
                    "raise ALPHA or lower --clients")


@dataclass
class Federation:
    """The pooled data of a federated image run: its meta (shape, classes, normalisation of the
    pooled training split), each split's arrays, and each client's training indices."""

    meta: dict
    splits: dict  # split name -> (x uint8 (N, H, W, C), y int64 (N,))
    clients: list[np.ndarray]
    source: str  # the data directory the final run records (a single --data; by-file: the pooled copy)

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clients]

    @property
    def has_validation(self) -> bool:
        return bool(len(self.splits["val"][1]))

    def class_counts(self) -> list[dict[str, int]]:
        y, names = self.splits["train"][1], self.meta["classes"]
        return [{names[k]: int(v) for k, v in enumerate(np.bincount(y[c], minlength=len(names))) if v}
                for c in self.clients]

    def write_client(self, i: int, path: Path) -> Path:
        """Client ``i``'s training examples as a data directory (empty validation and test splits)."""
        x, y = self.splits["train"]
        idx = self.clients[i]
        path.mkdir(parents=True, exist_ok=True)
        names = self.meta["classes"]
        counts = np.bincount(y[idx], minlength=len(names))
        meta = {**self.meta, "source": f"client {i} of a federation over {self.source}",
                "splits": {s: {"images": int(len(idx)) if s == "train" else 0,
                               "per_class": {names[k]: int(counts[k]) if s == "train" else 0
                                             for k in range(len(names))}} for s in SPLITS}}
        empty = np.zeros((0, *x.shape[1:]), dtype=np.uint8)
        for s in SPLITS:
            np.save(path / f"{s}_x.npy", np.ascontiguousarray(x[idx]) if s == "train" else empty)
            np.save(path / f"{s}_y.npy", y[idx] if s == "train" else np.zeros(0, dtype=np.int64))
        write_json(path / "labels.json", names)
        write_json(path / "meta.json", meta)
        return path

    def write_pooled(self, path: Path) -> Path:
        """All splits as one data directory (``by-file``: what the final run evaluates on)."""
        path.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            np.save(path / f"{s}_x.npy", np.ascontiguousarray(self.splits[s][0]))
            np.save(path / f"{s}_y.npy", self.splits[s][1])
        write_json(path / "labels.json", self.meta["classes"])
        write_json(path / "meta.json", self.meta)
        return path


def _check_sources(paths: list, clients: int | None, scheme: str, spec: str) -> None:
    if scheme != "by-file":
        if len(paths) != 1:
            raise UserError(f"--partition {spec} splits one --data directory; give several with --partition by-file")
        if clients is None or clients < 1:
            raise UserError(f"--clients must be a positive number, got {clients}")
        return
    if len(paths) < 2:
        raise UserError("--partition by-file needs one --data directory per client (two or more)")
    if clients is not None and clients != len(paths):
        raise UserError(f"--partition by-file: {len(paths)} --data directories are {len(paths)} clients, "
                        f"not --clients {clients}")


def federation(paths: list[str], clients: int | None, spec: str, seed: int, task: str = "image-classify",
               window: int = 0, options=None):
    """The federation over ``paths`` under ``spec``: ``prepare --kind images`` directories; for
    ``task`` lm token directories cut into windows of ``window`` tokens; for classify one
    labelled file (``options``: the classify task's, for its columns and validation share)."""
    scheme, alpha = parse_scheme(spec)
    if task == "lm":
        return TokenFederation.of(paths, clients, scheme, spec, seed, window)
    if task == "classify":
        return TextFederation.of(paths, clients, scheme, alpha, spec, seed, options)
    datas = [ImageData.open(p) for p in paths]
    _check_sources(datas, clients, scheme, spec)
    if scheme != "by-file":
        data = datas[0]
        splits = {s: tuple(np.asarray(a) for a in data.split(s)) for s in SPLITS}
        parts = split_clients(splits["train"][1], clients, scheme, alpha, seed)
        return Federation(dict(data.meta), splits, parts, str(Path(paths[0]).resolve()))
    first = datas[0].meta
    for d in datas[1:]:
        if d.meta["shape"] != first["shape"] or d.meta["classes"] != first["classes"]:
            raise UserError(f"--partition by-file: {d.path} holds {d.meta['shape']} images of classes "
                            f"{d.meta['classes'][:5]}, {datas[0].path} {first['shape']} of {first['classes'][:5]}; "
                            "every client must have the same shape and classes")
    splits, parts, offset = {}, [], 0
    for s in SPLITS:
        arrays = [tuple(np.asarray(a) for a in d.split(s)) for d in datas]
        splits[s] = (np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays]))
        if s == "train":
            for a in arrays:
                parts.append(np.arange(offset, offset + len(a[1])))
                offset += len(a[1])
    if min(len(p) for p in parts) < MIN_EXAMPLES:
        raise UserError(f"--partition by-file: every client needs at least {MIN_EXAMPLES} training examples")
    pixels = splits["train"][0].astype(np.float64) / 255.0
    meta = {**first, "inputs": [str(d.path) for d in datas], "source": "pooled for a federation",
            "mean": [round(float(v), 6) for v in pixels.mean(axis=(0, 1, 2))],
            "std": [round(max(float(v), 1e-6), 6) for v in pixels.std(axis=(0, 1, 2))],
            "splits": {s: {"images": int(len(splits[s][1])),
                           "per_class": {n: int(v) for n, v in zip(first["classes"], np.bincount(
                               splits[s][1], minlength=len(first["classes"])))}} for s in SPLITS}}
    return Federation(meta, splits, parts, "")


@dataclass
class TokenFederation:
    """The token data of a federated ``lm`` run: each client's training tokens (whole windows,
    ``iid``; a site's whole file, ``by-file``) and the validation tokens the server evaluates on."""

    meta: dict  # the first directory's (tokenizer, dtype, vocabulary)
    tokenizer: Path  # its tokenizer.json
    clients: list[np.ndarray]  # each client's training tokens
    val: np.ndarray
    source: str  # as Federation.source

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clients]

    @property
    def has_validation(self) -> bool:
        return len(self.val) > 0

    def class_counts(self) -> None:
        return None  # no labels

    def _write(self, path: Path, train: np.ndarray, what: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        dtype = np.dtype(self.meta["dtype"])
        train.astype(dtype).tofile(path / "train.bin")
        self.val.astype(dtype).tofile(path / "val.bin")
        shutil.copyfile(self.tokenizer, path / "tokenizer.json")
        splits = {"train": {"tokens": int(len(train))}, "val": {"tokens": int(len(self.val))}}
        write_json(path / "meta.json", {**self.meta, "source": what, "tokens": int(len(train) + len(self.val)),
                                        "splits": splits})
        return path

    def write_client(self, i: int, path: Path) -> Path:
        """Client ``i``'s training tokens as a data directory (with the federation's validation
        tokens, which the client does not evaluate on: its trainer needs a file to open)."""
        return self._write(path, self.clients[i], f"client {i} of a federation over {self.source}")

    def write_pooled(self, path: Path) -> Path:
        return self._write(path, np.concatenate(self.clients), "pooled for a federation")

    @classmethod
    def of(cls, paths: list[str], clients: int | None, scheme: str, spec: str, seed: int,
           window: int) -> "TokenFederation":
        if scheme == "dirichlet":
            raise UserError("--partition dirichlet skews labels; token data has none: use iid or by-file "
                            "with --task lm")
        _check_sources(paths, clients, scheme, spec)
        metas = [load_meta(p) for p in paths]
        tokenizers = [(Path(p) / "tokenizer.json").read_bytes() for p in paths]
        trains = [np.asarray(TokenFile(Path(p) / "train.bin", m["dtype"]).data) for p, m in zip(paths, metas)]
        vals = [np.asarray(TokenFile(Path(p) / "val.bin", m["dtype"]).data) for p, m in zip(paths, metas)]
        for p, t in zip(paths[1:], tokenizers[1:]):
            if t != tokenizers[0]:
                raise UserError(f"--partition by-file: {p} was tokenized with another tokenizer than {paths[0]}; "
                                f"prepare every site's data with `lmforge prepare --tokenizer {paths[0]} ...`")
        least = MIN_EXAMPLES * (window + 1)
        if scheme == "iid":
            n = (len(trains[0]) - 1) // (window + 1)
            if n < clients * MIN_EXAMPLES:
                raise UserError(f"{paths[0]} holds {n} windows of {window + 1} tokens: too few to give {clients} "
                                f"clients {MIN_EXAMPLES} each; lower --clients or model.block_size")
            windows = trains[0][:n * (window + 1)].reshape(n, window + 1)
            order = np.random.default_rng([seed, 29]).permutation(n)
            parts = [windows[np.sort(part)].reshape(-1) for part in np.array_split(order, clients)]
            return cls(metas[0], Path(paths[0]) / "tokenizer.json", parts, vals[0], str(Path(paths[0]).resolve()))
        for p, t in zip(paths, trains):
            if len(t) < least:
                raise UserError(f"--partition by-file: {p} holds {len(t)} training tokens; every client needs at "
                                f"least {least} ({MIN_EXAMPLES} windows of {window + 1})")
        return cls(metas[0], Path(paths[0]) / "tokenizer.json", trains, np.concatenate(vals), "")


@dataclass
class TextFederation:
    """The labelled texts of a federated ``classify`` run: the training rows (texts, label ids),
    each client's indices into them, and the class names every client's head is built for."""

    train: object  # Examples
    y: np.ndarray
    names: list[str]
    clients: list[np.ndarray]
    has_validation: bool
    source: str
    columns: tuple[str, str]  # (text, label)

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clients]

    def class_counts(self) -> list[dict[str, int]]:
        return [{self.names[k]: int(v) for k, v in enumerate(np.bincount(self.y[c], minlength=len(self.names))) if v}
                for c in self.clients]

    def write_client(self, i: int, path: Path) -> Path:
        """Client ``i``'s training rows as a JSONL file (``path/train.jsonl``)."""
        import json

        from lmforge.fsutil import write_text

        text, label = self.columns
        path.mkdir(parents=True, exist_ok=True)
        rows = [{text: self.train.texts[j], label: self.train.labels[j]} for j in self.clients[i]]
        write_text(path / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return path / "train.jsonl"

    @classmethod
    def of(cls, paths: list[str], clients: int | None, scheme: str, alpha: float | None, spec: str, seed: int,
           options) -> "TextFederation":
        from lmforge.data.labeled import label_names, read_examples, stratified_split

        if scheme == "by-file":
            raise UserError("--task classify federates one labelled file (iid or dirichlet:ALPHA); sites that each "
                            "hold their own file join through --superlink (their data-path)")
        _check_sources(paths, clients, scheme, spec)
        ex = read_examples(paths[0], options.text_column, options.label_column)
        train, val = ex, None
        if options.val_fraction > 0:
            train, val = stratified_split(ex, options.val_fraction, seed=0)  # as the classify task splits it
        names = list(options.labels) if options.labels else label_names(train.labels)
        index = {n: k for k, n in enumerate(names)}
        unknown = sorted(set(train.labels) - set(index))
        if unknown:
            raise UserError(f"{paths[0]}: labels not in task.labels: {', '.join(unknown[:10])}")
        y = np.array([index[label] for label in train.labels])
        parts = split_clients(y, clients, scheme, alpha, seed)
        return cls(train, y, names, parts, val is not None and len(val) > 0, str(Path(paths[0]).resolve()),
                   (options.text_column, options.label_column))
