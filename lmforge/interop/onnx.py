"""ONNX graphs of a run's model, and their check against PyTorch with onnxruntime.

Graphs (opset ``OPSET``, every batch and sequence axis dynamic):

- text classifier: ``input_ids``, ``attention_mask`` (B, T) int64 -> ``logits`` (B, K);
- image classifier: ``pixels`` (B, C, H, W) float in [0, 1] -> ``logits`` (B, K) (the run's
  normalisation is inside the graph);
- decoder: ``input_ids`` (B, T) and ``past_key_N``/``past_value_N`` (B, n_kv_head, P, head_dim) per
  layer -> ``logits`` (B, T, V) and ``present_key_N``/``present_value_N`` (B, n_kv_head, P + T,
  head_dim): the first call passes P = 0 (the prompt), each next one the new token and the presents,
  so generation never recomputes the prompt.

Export runs PyTorch's TorchScript-based exporter (the torch.export-based one needs onnxscript),
on the model's own forward; the decoder's KV cache is swapped for :class:`ConcatCache`, which
concatenates keys and values instead of writing into a preallocated buffer.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lmforge.errors import UserError

OPSET = 17


class ConcatCache:
    """The KV-cache protocol :func:`~lmforge.models.decoder.attend` uses, over past tensors: each
    layer's keys/values are the past ones with the new ones appended (``presents``)."""

    def __init__(self, past: list[torch.Tensor], groups: int):
        self.past = past  # [k0, v0, k1, v1, ...], (B, n_kv, P, hs) each
        self.groups = groups  # query heads per key/value head
        self.presents: list[torch.Tensor] = []

    def update(self, layer, input_pos, k, v, attend_all):
        k = torch.cat([self.past[2 * layer], k], dim=2)
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.presents += [k, v]
        if self.groups > 1:  # grouped-query attention as plain attention: the exporter has no GQA form
            k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        return k, v

    def mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """The query at position p sees keys 0..p: (T, P + T)."""
        keys = torch.arange(input_pos[-1] + 1, device=input_pos.device)
        return input_pos[:, None] >= keys[None, :]


class DecoderWithPast(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *past):
        P = past[0].size(2)
        pos = torch.arange(input_ids.size(1), device=input_ids.device) + P
        cache = ConcatCache(list(past), self.model.config.n_head // self.model.cache_shape()[1])
        logits, _ = self.model(input_ids, cache=cache, input_pos=pos)
        return (logits, *cache.presents)


class TextClassifier(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.classify(input_ids, attention_mask)


class ImageClassifier(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model.classify(pixels)


def kind_of(run) -> str:
    from lmforge.models.decoder import Decoder
    from lmforge.runs import answer_kind

    task = run.config.task.name
    kind = answer_kind(task, run.model.can_generate)
    # A decoder exports when its cache is keys and values (it says their shape); a recurrent state is not.
    if kind is not None and (kind != "decoder" or type(run.model).cache_shape is not Decoder.cache_shape):
        return kind
    raise UserError(f"ONNX export covers text and image classifiers and transformer decoders; {run.path} is a "
                    f"{task} run of a {run.config.arch} model")


def _sample_inputs(run, kind: str, batch: int = 2, length: int = 8) -> tuple[dict[str, torch.Tensor], tuple]:
    g = torch.Generator().manual_seed(0)
    m = run.model
    if kind == "image-classifier":
        c = run.config.model
        return {"pixels": torch.rand(batch, c.in_channels, c.height, c.width, generator=g)}, (("pixels", (0,)),)
    ids = torch.randint(0, m.config.vocab_size, (batch, length), generator=g)
    if kind == "text-classifier":
        mask = torch.ones_like(ids)
        mask[0, length // 2:] = 0  # a padded row
        return {"input_ids": ids, "attention_mask": mask}, ()
    L, H, D = m.cache_shape()
    past = {}
    for i in range(L):
        for kv in ("key", "value"):
            past[f"past_{kv}_{i}"] = torch.randn(batch, H, 3, D, generator=g)
    return {"input_ids": ids, **past}, ()


def export_onnx(run, path: Path) -> dict:
    """Write ``run``'s model as an ONNX graph to ``path``; returns the graph's description."""
    kind = kind_of(run)
    model = run.model.cpu().eval()
    inputs, _ = _sample_inputs(run, kind)
    if kind == "text-classifier":
        module, outputs = TextClassifier(model), ["logits"]
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"}}
    elif kind == "image-classifier":
        module, outputs, axes = ImageClassifier(model), ["logits"], {"pixels": {0: "batch"}, "logits": {0: "batch"}}
    else:
        L = model.cache_shape()[0]
        module = DecoderWithPast(model)
        presents = [f"present_{kv}_{i}" for i in range(L) for kv in ("key", "value")]
        outputs = ["logits", *presents]
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
        axes |= {n: {0: "batch", 2: "past"} for n in inputs if n.startswith("past_")}
        axes |= {n: {0: "batch", 2: "total"} for n in presents}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module.eval(), tuple(inputs.values()), str(path), input_names=list(inputs),
                          output_names=outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    model.eval()  # export restores the wrapper's mode; the model stays in eval mode
    return {"kind": kind, "inputs": list(inputs), "outputs": outputs, "opset": OPSET}


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _torch_outputs(run, kind: str, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    module = {"text-classifier": TextClassifier, "image-classifier": ImageClassifier,
              "decoder": DecoderWithPast}[kind](run.model).eval()
    with torch.no_grad():
        out = module(*inputs.values())
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


class SessionClassifier:
    """An onnxruntime session of an exported classifier with the ``classify`` a PyTorch classifier
    has, so that the task's own evaluation (``compress.report``'s workloads) measures the graph."""

    def __init__(self, sess, model):
        self.sess, self.config = sess, model.config
        self.names = [i.name for i in sess.get_inputs()]

    def eval(self):
        return self

    def classify(self, *inputs) -> torch.Tensor:
        feeds = {name: t.cpu().numpy() for name, t in zip(self.names, inputs)}
        return torch.from_numpy(self.sess.run(None, feeds)[0])


def max_difference(run, sess, kind: str) -> tuple[float, float]:
    """The largest |onnxruntime - PyTorch| over every output, on inputs of another batch and
    length than the export's (the dynamic axes at work), and the largest |PyTorch output|."""
    inputs, _ = _sample_inputs(run, kind, batch=3, length=11)
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    want = _torch_outputs(run, kind, inputs)
    return (float(max(np.abs(g - w).max() for g, w in zip(got, want))),
            float(max(np.abs(w).max() for w in want)))


def greedy_onnx(sess, model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding through the graph: the prompt once, then one token per call with the presents."""
    L, H, D = model.cache_shape()
    feeds = {f"past_{kv}_{i}": np.zeros((1, H, 0, D), np.float32) for i in range(L) for kv in ("key", "value")}
    ids = np.array([prompt], dtype=np.int64)
    out = []
    for _ in range(n):
        logits, *presents = sess.run(None, {"input_ids": ids, **feeds})
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        feeds = {name: p for name, p in zip(feeds, presents)}
        ids = np.array([[nxt]], dtype=np.int64)
    return out


def speed(run, sess, kind: str, repeats: int = 20) -> dict:
    """Median batch-1 latency of onnxruntime and of PyTorch on the same input (ms)."""
    inputs, _ = _sample_inputs(run, kind, batch=1, length=32)
    if kind == "decoder":  # a 32-token prompt from an empty past
        inputs = {k: (v[:, :, :0].contiguous() if k.startswith("past_") else v) for k, v in inputs.items()}
    feeds = {k: v.numpy() for k, v in inputs.items()}

    def median(fn):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * float(np.median(times))

    ort_ms = median(lambda: sess.run(None, feeds))
    torch_ms = median(lambda: _torch_outputs(run, kind, inputs))
    return {"onnxruntime_ms": ort_ms, "pytorch_ms": torch_ms, "speedup": torch_ms / ort_ms}


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic int8 quantisation of the graph's MatMul/Gemm weights, one scale per
    output channel (as ``lmforge compress --quantize int8``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process the graph goes to the root logger
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
