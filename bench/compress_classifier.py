"""The data of the compression benchmark on a real encoder: the classification quickstart's stdlib
docstrings (labelled by package, split by source file), four folds for training and the fifth
for validation, written as train.jsonl / val.jsonl into the directory given.

    python bench/compress_classifier.py DIR
    lmforge train --task classify --data DIR/train.jsonl --val DIR/val.jsonl --out DIR/minilm \\
        --epochs 2 --max-length 128 --max-seconds 420
    lmforge compress DIR/minilm --out DIR/minilm-int8 --quantize int8 --batch-size 32
    lmforge export DIR/minilm --format onnx --out DIR/minilm-onnx --quantize int8
"""

import json
import sys
from pathlib import Path

from lmforge.data.corpus import stdlib_root
from lmforge.quickstart import stdlib_docstring_folds

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
folds = stdlib_docstring_folds(stdlib_root(), 5)
for name, parts in (("train", folds[:4]), ("val", folds[4:])):
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for part in parts:
            for text, label in zip(part.texts, part.labels):
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    print(name, sum(len(p) for p in parts))
