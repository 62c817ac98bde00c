"""GGUF files (llama.cpp's format) -> run directories: ``lmforge import-gguf``.

The ``gguf`` package reads the file and dequantizes each tensor to float32 (Q4_0, Q4_1, Q8_0, the
K-quants, F16, BF16, F32: whatever its ``quants.dequantize`` knows). Tensor names map to the HF
names our Llama family uses; llama.cpp's converter stores the query and key rows of a Llama
interleaved for its RoPE kernel, which :func:`unpermute` undoes (Qwen2 files are not permuted).
The tokenizer (byte-level BPE, or SentencePiece BPE with byte fallback; control tokens) and the
Jinja chat template come from the file's metadata, built as ``transformers`` builds them from the
same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.models.llama import LlamaConfig

ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor names (per block, after "blk.N.") -> our (= Hugging Face's) names.
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Qwen2's pre-tokenizer split (its HF tokenizer's, which transformers' GGUF converter uses too).
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` of ``path``; a missing or malformed file is one error line."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such GGUF file: {path}")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, ... on a damaged file
        raise UserError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's query/key row order: within each head, rows (pair i, half h) were stored as
    (i, h) interleaved; HF's rotate_half wants the first halves, then the second halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_config(reader, tensor_names: set[str]) -> tuple[str, LlamaConfig]:
    """(architecture, our config) from the file's metadata."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    if "rope_freqs.weight" in tensor_names:
        raise UserError("this GGUF scales RoPE with per-frequency factors (rope_freqs, Llama 3.1 style), "
                        "which import-gguf does not read yet")

    def get(key, default=None, required=False):
        value = field(reader, f"{arch}.{key}", default)
        if isinstance(value, list):
            raise UserError(f"GGUF {arch}.{key} varies by layer; import-gguf needs one value")
        if required and value is None:
            raise UserError(f"the GGUF file has no {arch}.{key} (not a complete {arch} model)")
        return value
    n_embd, n_head = int(get("embedding_length", required=True)), int(get("attention.head_count", required=True))
    scaling = {}
    if get("rope.scaling.type") in ("linear",):
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif get("rope.scaling.type") not in (None, "none"):
        raise UserError(f"GGUF RoPE scaling {get('rope.scaling.type')!r} is not supported (linear only)")
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    config = LlamaConfig(
        vocab_size=int(get("vocab_size", len(tokens))), block_size=int(get("context_length", 2048)),
        n_layer=int(get("block_count", required=True)), n_head=n_head, n_kv_head=int(get("attention.head_count_kv", n_head)),
        n_embd=n_embd, head_dim=int(get("attention.key_length", n_embd // n_head)),
        n_inner=int(get("feed_forward_length", required=True)), rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling, rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_names, qkv_bias="blk.0.attn_q.bias" in tensor_names)
    return arch, config


def read_state(reader, arch: str, config: LlamaConfig, progress=None) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under our names."""
    from gguf import quants

    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK:
            name = f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in _TOP:
            name = f"{_TOP[parts[0]]}.{parts[1]}"
        else:
            raise UserError(f"GGUF tensor {t.name!r} has no place in a {arch} model")
        try:
            data = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"GGUF tensor {t.name!r}: quantization {t.tensor_type.name} is not supported by the "
                            "gguf package's dequantizer") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest-varying dimension first
        w = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)  # a copy: the file is mapped read-only
        if arch == "llama" and parts[-2] in ("attn_q", "attn_k"):
            w = unpermute(w, config.n_head if parts[-2] == "attn_q" else config.n_kv_head)
        state[name] = w.contiguous()
        if progress is not None:
            progress.update(1)
    return state


def read_tokenizer(reader, arch: str):
    """The file's tokenizer, built as ``transformers`` builds it from the same metadata: byte-level
    BPE (``gpt2``: vocabulary and merges) or SentencePiece BPE (``llama``: vocabulary and scores,
    with byte fallback), its control tokens as special tokens."""
    from tokenizers import AddedToken

    kind = field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' or "
                        "SentencePiece 'llama')")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise UserError("the GGUF file has no tokenizer vocabulary")
    tok = _byte_level_bpe(reader, arch, tokens) if kind == "gpt2" else _sentencepiece_bpe(reader, tokens)
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == _CONTROL])
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


def _byte_level_bpe(reader, arch: str, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = field(reader, "tokenizer.ggml.merges")
    if not merges:
        raise UserError("the GGUF file's byte-level BPE tokenizer has no merges")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges],
                               fuse_unk=False))
    if arch == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary, which stores scores instead: every split of a
    piece into two pieces, the best-scored pieces first (as ``transformers`` derives them)."""
    score = dict(zip(tokens, scores))
    merges = []
    for piece, s in score.items():
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in score and piece[i:] in score]
        pairs.sort(key=lambda lr: (score[lr[0]], score[lr[1]]), reverse=True)
        merges.extend((s, lr) for lr in pairs)
    merges.sort(key=lambda m: m[0], reverse=True)  # stable: ties keep the order above
    return [lr for _, lr in merges]


def _sentencepiece_bpe(reader, tokens: list[str]):
    """Llama/Mistral-style SentencePiece: spaces become "▁" (and one is put before the text unless
    ``tokenizer.ggml.add_space_prefix`` is false), unknown characters fall back to byte tokens
    (``<0x0A>``), and decoding drops the space put before the text."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    merges = field(reader, "tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges else \
        spm_merges(tokens, field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens))
    unk = field(reader, "tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=True, byte_fallback=True,
                               unk_token=tokens[int(unk)] if unk is not None else None))
    prefix = field(reader, "tokenizer.ggml.add_space_prefix", True)
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def chat_template(reader, tokens: list[str]) -> dict | None:
    """The file's Jinja chat template as a ``chat_template.json`` (None if it has none); the answer
    ends at the file's end-of-sequence token."""
    source = field(reader, "tokenizer.chat_template")
    if not source:
        return None

    def token(key):
        i = field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else ""
    return {"jinja": source, "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
            "end_token": token("eos_token_id") or None, "stop": []}


def import_gguf(path: str | Path, run_dir: str | Path) -> dict:
    """Turn a GGUF file into an lmforge run directory (written atomically)."""
    from lmforge import config as cfgmod
    from lmforge.chat import save_chat_template
    from lmforge.fsutil import atomic_dir
    from lmforge.models.llama import Llama
    from lmforge.progress import progress
    from lmforge.tasks import TASKS
    from lmforge.train.checkpoint import MODEL_FILE, save_model

    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"output directory {run_dir} is not empty")
    reader = open_gguf(path)
    names = {t.name for t in reader.tensors}
    arch = field(reader, "general.architecture")
    tokenizer = read_tokenizer(reader, arch) if arch in ARCHITECTURES else None
    arch, config = llama_config(reader, names)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tokenizer.get_vocab_size()} tokens, the model "
                        f"{config.vocab_size} embeddings")
    bar = progress(total=len(reader.tensors), desc="dequantizing", unit="tensor")
    state = read_state(reader, arch, config, bar)
    bar.close()
    model = Llama(config)
    try:
        model.load_saved_state({k: v for k, v in state.items() if not (config.tie_embeddings and k == "lm_head.weight")})
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from None
    template = chat_template(reader, field(reader, "tokenizer.ggml.tokens"))
    quant = sorted({t.tensor_type.name for t in reader.tensors})
    with atomic_dir(run_dir) as tmp:
        cfgmod.save(cfgmod.RunConfig(task=TASKS["lm"].Options(), model=model.config, arch="llama"),
                    tmp / "config.yaml")
        tokenizer.save(str(tmp / "tokenizer.json"))
        save_model(model, tmp / MODEL_FILE, metadata={"format": "lmforge-llama", "imported_from": str(path)})
        save_chat_template(tmp, template)
    return {"run_dir": str(run_dir), "architecture": arch, "name": field(reader, "general.name"),
            "arch": "llama", "params": model.num_params(), "n_layer": config.n_layer, "n_embd": config.n_embd,
            "n_head": config.n_head, "n_kv_head": config.n_kv_head, "vocab_size": config.vocab_size,
            "block_size": config.block_size, "quantization": quant, "chat_template": template is not None}


# ------------------------------------------------------------------------------------ export
GGUF_TYPES = ("f32", "f16", "q8_0")  # what export writes: 2-D weights in this type, norms and biases in F32
_NORMAL, _UNKNOWN, _UNUSED, _BYTE = 1, 2, 5, 6  # llama.cpp token types (besides _CONTROL, _USER_DEFINED)


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """:func:`unpermute`'s inverse: HF's query/key rows in llama.cpp's interleaved order."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_vocabulary(tokenizer, vocab_size: int) -> dict:
    """The GGUF ``tokenizer.ggml.*`` fields of a byte-level BPE (``gpt2``) or SentencePiece BPE
    (``llama``) tokenizer: tokens in id order padded with unused tokens to the model's
    ``vocab_size`` embeddings (llama.cpp wants one token per row), their llama.cpp types, the
    merges, and for SentencePiece the scores (llama.cpp merges by them: each piece scored by the
    rank of the merge that makes it, so both orders agree)."""
    import json
    import re

    spec = json.loads(tokenizer.to_str())
    model = spec.get("model", {})
    spm = model.get("type") == "BPE" and model.get("byte_fallback")
    if model.get("type") != "BPE" or not (spm or "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))):
        raise UserError("export to GGUF needs a byte-level BPE (GPT-2 style) or SentencePiece BPE tokenizer, "
                        "as Llama-family runs have")
    tokens = [""] * max(vocab_size, tokenizer.get_vocab_size())
    types = [_UNUSED] * len(tokens)
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, _BYTE if spm and re.fullmatch(r"<0x[0-9A-F]{2}>", token) else _NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    if spm and model.get("unk_token") in model["vocab"]:
        types[model["vocab"][model["unk_token"]]] = _UNKNOWN
    for i, t in enumerate(tokens):
        if not t:
            tokens[i] = f"<|unused_{i}|>"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out = {"model": "llama" if spm else "gpt2", "tokens": tokens, "types": types, "merges": merges}
    if spm:
        rank = {}
        for k, m in enumerate(merges):
            rank.setdefault(m.replace(" ", "", 1), k)
        out["scores"] = [-float(rank.get(t, len(merges))) for t in tokens]
        out["add_space_prefix"] = "Prepend" in json.dumps(spec.get("normalizer"))
        out["unk_token_id"] = model["vocab"].get(model.get("unk_token"))
    return out


def export_gguf(run, out_file: str | Path, dtype: str = "f16") -> dict:
    """Write a loaded Llama-family ``run`` (:func:`lmforge.runs.load_run`) as one GGUF file
    (written to a temp file, then renamed): llama.cpp's
    tensor names and query/key row order (Qwen2-style runs with q/k/v biases as ``qwen2``, which
    is not permuted), the config, the byte-level BPE tokenizer and the Jinja chat template in the
    metadata — what :func:`import_gguf` and ``transformers`` read back."""
    import gguf

    from lmforge.chat import end_token_id, load_chat_template
    from lmforge.fsutil import atomic_path

    if dtype not in GGUF_TYPES:
        raise UserError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {dtype!r}")
    run_dir = run.path
    c = run.model.config
    if run.config.arch != "llama" or getattr(c, "num_labels", 0):
        raise UserError(f"export to GGUF takes a Llama-family decoder run; {run_dir} is {run.config.arch}"
                        + (" with a classification head" if getattr(c, "num_labels", 0) else ""))
    if run.config.finetune.lora.r:
        raise UserError(f"{run_dir} holds LoRA adapters: merge them first (lmforge merge-lora)")
    if c.rope_scaling and c.rope_scaling.get("rope_type") != "linear":
        raise UserError(f"RoPE scaling {c.rope_scaling.get('rope_type')!r} has no GGUF form here (linear only)")
    arch = "qwen2" if c.qkv_bias else "llama"
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    vocabulary = gguf_vocabulary(run.tokenizer, c.vocab_size)
    tokens = vocabulary["tokens"]
    template = load_chat_template(run_dir)
    names = {v: k for k, v in _BLOCK.items()}
    top = {v: k for k, v in _TOP.items()}
    out_file = Path(out_file)
    with atomic_path(out_file) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(Path(run_dir).resolve().name)
        w.add_context_length(c.block_size)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.n_inner)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_kv_head)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_freq_base(c.rope_theta)
        if c.rope_scaling:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_vocab_size(len(tokens))
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        w.add_tokenizer_model(vocabulary["model"])
        w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
        w.add_token_list(tokens)
        w.add_token_types(vocabulary["types"])
        w.add_token_merges(vocabulary["merges"])
        if vocabulary["model"] == "llama":
            w.add_token_scores(vocabulary["scores"])
            w.add_add_space_prefix(vocabulary["add_space_prefix"])
            if vocabulary["unk_token_id"] is not None:
                w.add_unk_token_id(vocabulary["unk_token_id"])
        eos = (run.tokenizer.token_to_id(template["eos_token"]) if template.get("eos_token")
               else end_token_id(template, run.tokenizer))
        bos = run.tokenizer.token_to_id(template["bos_token"]) if template.get("bos_token") else None
        bos = eos if bos is None else bos  # GPT-2 style: one end-of-text token (and readers want both ids)
        if bos is not None:
            w.add_bos_token_id(bos)
        if eos is not None:
            w.add_eos_token_id(eos)
        w.add_add_bos_token(False)
        if "jinja" in template:
            w.add_chat_template(template["jinja"])
        state = run.model.state_dict_for_save()
        written = {}
        for name, t in state.items():
            parts = name.split(".")
            if parts[:2] == ["model", "layers"]:
                gname = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"
            else:
                gname = f"{top['.'.join(parts[:-1])]}.{parts[-1]}"
            t = t.detach().float()
            if arch == "llama" and parts[-2] in ("q_proj", "k_proj"):
                t = permute(t, c.n_head if parts[-2] == "q_proj" else c.n_kv_head)
            data = t.contiguous().numpy()
            kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
            if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
                kind = gguf.GGMLQuantizationType.F16  # Q8_0 packs rows in blocks of 32
            w.add_tensor(gname, gguf.quants.quantize(data, kind),
                         raw_dtype=kind if kind == gguf.GGMLQuantizationType.Q8_0 else None)
            written[kind.name] = written.get(kind.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"run": str(run_dir), "file": str(out_file), "architecture": arch, "type": dtype,
            "size_mb": out_file.stat().st_size / 2**20, "tensors": written, "vocab_size": len(tokens),
            "chat_template": "jinja" in template}


TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "q8_0": 1e-1}  # the largest |logit diff| an export accepts, over the
# logits' largest magnitude: fp32 is exact up to summation order; F16 and Q8_0 round every weight
CHECK_TOKENS = 16


def check_gguf(run, path: str | Path, dtype: str) -> dict:
    """The GGUF file at ``path`` read back as :func:`import_gguf` reads it, against ``run``: max
    |logit diff| on a prompt, relative to the logits' scale, and greedy decoding of
    ``CHECK_TOKENS`` tokens (equal or not: F16 and Q8_0 may change a near tie)."""
    from lmforge.generate import generate_ids
    from lmforge.models.llama import Llama

    reader = open_gguf(path)
    arch, config = llama_config(reader, {t.name for t in reader.tensors})
    back = Llama(config)
    state = read_state(reader, arch, config)
    back.load_saved_state({k: v for k, v in state.items() if not (config.tie_embeddings and k == "lm_head.weight")})
    back.eval()
    prompt = run.tokenizer.encode("The answer is", add_special_tokens=False).ids[:8] or [0]
    x = torch.tensor([prompt])
    with torch.no_grad():
        ours, theirs = run.model(x)[0], back(x)[0]
    diff, scale = float((ours - theirs).abs().max()), float(ours.abs().max())
    greedy = [[int(t[0]) for t in generate_ids(m, x, CHECK_TOKENS, temperature=0.0)] for m in (run.model, back)]
    return {"max_abs_diff": diff, "output_scale": scale, "tolerance": TOLERANCE[dtype],
            "within_tolerance": diff <= TOLERANCE[dtype] * max(1.0, scale),
            "greedy_tokens": CHECK_TOKENS, "greedy_tokens_equal": greedy[0] == greedy[1]}
