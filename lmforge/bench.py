"""``lmforge bench``: lmforge's GPT against Hugging Face ``transformers`` GPT-2 of the same shape.

Both implementations run in the same process, on the same device and random tokens, after
warm-up, alternating in rounds so that a change in the machine's speed (clocks, another process)
hits both alike. Figures are medians over rounds. The reference is HF in its fastest documented
configuration: ``torch.compile`` for training, a static KV cache for decoding. Generation uses
the same weights in both and checks that greedy decoding gives the same tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from datetime import date

import numpy as np
import torch

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.train.optim import build_optimizer
from lmforge.device import autocast_for, compile_fn, peak_flops

LMFORGE, REFERENCE = "lmforge", "hf-transformers"


def reference_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _environment(device: torch.device) -> dict:
    from lmforge.evaluate.report import cpu_name

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    env = {"device": str(device), "device_name": name, "torch": torch.__version__,
           "date": date.today().isoformat(), "cpu_threads": torch.get_num_threads()}
    if reference_available():
        import transformers

        env["transformers"] = transformers.__version__
    return env


class _Impl:
    """One implementation under test: a step function and what is needed to report on it."""

    def __init__(self, name: str, run_step, static_bytes: int):
        self.name, self.run_step, self.static_bytes = name, run_step, static_bytes
        self.times: list[float] = []  # seconds per step (or per call), one entry per round
        self.peak_bytes = 0
        self.outputs = None


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines, which no setting turns off)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _cpu_peak_bytes(fn) -> int | None:
    """Peak bytes that one call of ``fn`` allocated on the CPU on top of what was there.

    PyTorch keeps no allocator statistics for the CPU, so the call runs once under the profiler
    with memory events, and the running sum of its allocations and frees gives the peak (what
    ``torch.cuda.max_memory_allocated`` gives on CUDA). None if the profiler records no events
    (or, in another torch version than the pinned one, no longer exposes them this way).
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = sorted((e for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                        key=lambda e: e.start_ns())
    except AttributeError:
        return None
    if not events:
        return None
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _rounds(impls: list[_Impl], device: torch.device, warmup: int, rounds: int, steps: int,
            desc: str, memory: bool = True) -> None:
    """Warm each up, then alternate ``rounds`` times, timing ``steps`` calls of each per round.
    On the CPU, with ``memory``, one more call of each, untimed, under the profiler measures its
    peak memory."""
    from lmforge.progress import progress

    for impl in impls:
        for _ in range(warmup):
            impl.outputs = impl.run_step()
    _sync(device)
    bar = progress(total=rounds * len(impls), desc=desc, unit="round")
    for r in range(rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for impl in order:
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                impl.outputs = impl.run_step()
            _sync(device)
            impl.times.append((time.perf_counter() - t0) / steps)
            if device.type == "cuda":
                # Own weights and optimizer state + what its steps allocated on top of what was there.
                peak = torch.cuda.max_memory_allocated(device) - base + impl.static_bytes
                impl.peak_bytes = max(impl.peak_bytes, peak)
            bar.update(1)
    bar.close()
    if device.type == "cpu" and memory:
        for impl in impls:
            impl.outputs = None  # freed before the window: a free of a block it never saw allocated warns
            peak = _cpu_peak_bytes(lambda: setattr(impl, "outputs", impl.run_step()))
            impl.peak_bytes = peak + impl.static_bytes if peak is not None else 0


def _summary(impl: _Impl, tokens_per_call: int, flops_per_token: float | None, peak: float | None) -> dict:
    t = statistics.median(impl.times)
    out = {"median_step_ms": round(t * 1000, 3), "tokens_per_second": round(tokens_per_call / t, 1),
           "step_ms_min": round(min(impl.times) * 1000, 3), "step_ms_max": round(max(impl.times) * 1000, 3),
           "rounds": len(impl.times)}
    if flops_per_token and peak:
        out["mfu"] = round(flops_per_token * tokens_per_call / t / peak, 4)
    out["peak_memory_gb"] = round(impl.peak_bytes / 1e9, 4) if impl.peak_bytes else None
    return out


def _finish(result: dict) -> dict:
    if REFERENCE in result["results"]:
        result["ratio"] = round(result["results"][LMFORGE]["tokens_per_second"]
                                / result["results"][REFERENCE]["tokens_per_second"], 3)
    else:
        result["ratio"] = None
    return result


def bench_train(config: GPTConfig, batch_size: int, steps: int = 10, rounds: int = 5, warmup: int = 3,
                device: str = "cpu", compile: bool | None = None, dtype: str = "auto", loss_chunk: int = 0,
                activation_checkpointing: bool = False, reference: bool = True, seed: int = 0) -> dict:
    """Training steps (forward, backward, AdamW) per second on random tokens."""
    dev = torch.device(device)
    compile = dev.type == "cuda" if compile is None else compile
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    reference = reference and reference_available()
    torch.manual_seed(seed)
    T, V = config.block_size, config.vocab_size
    batches = [torch.randint(0, V, (batch_size, T + 1), device=dev) for _ in range(4)]
    ctx = autocast_for(dev, dtype)
    impls = []

    def make(name: str, model: torch.nn.Module, loss_of) -> _Impl:
        opt = build_optimizer(model, 3e-4, 0.1, (0.9, 0.95), dev.type)
        fwd = compile_fn(model) if compile else model
        state = {"i": 0}

        def run_step():
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            with ctx:
                loss = loss_of(fwd, b[:, :-1], b[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        impl = _Impl(name, run_step, _bytes(model.parameters()))
        impl.opt = opt
        return impl

    ours = GPT(config).to(dev)
    ours.activation_checkpointing = activation_checkpointing
    impls.append(make(LMFORGE, ours, lambda f, x, y: f(x, y, loss_chunk=loss_chunk)[1]))
    if reference:
        from lmforge.interop.hf import to_hf_gpt2

        hf = to_hf_gpt2(ours).train()
        if activation_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # HF shifts labels itself: inputs b[:, :-1] with labels = inputs scores T-1 positions.
        impls.append(make(REFERENCE, hf, lambda f, x, y: f(input_ids=x, labels=x).loss))
    _rounds(impls, dev, warmup, 1, 1, "warm-up", memory=False)  # first steps also create the optimizer state
    for impl in impls:
        impl.static_bytes += _bytes(t for s in impl.opt.state.values() for t in s.values()
                                    if isinstance(t, torch.Tensor))
        impl.times.clear()
        impl.peak_bytes = 0
    _rounds(impls, dev, 0, rounds, steps, "bench train")
    peak = peak_flops(dev)
    fpt = ours.flops_per_token(T)
    result = {"benchmark": "train", **_environment(dev),
              "settings": {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
                           "block_size": T, "vocab_size": V, "batch_size": batch_size, "steps_per_round": steps,
                           "rounds": rounds, "warmup": warmup, "compile": compile, "dtype": dtype,
                           "autocast_bf16": dtype == "bfloat16" or (dtype == "auto" and dev.type == "cuda"),
                           "loss_chunk": loss_chunk, "activation_checkpointing": activation_checkpointing,
                           "params": ours.num_params(), "flops_per_token": fpt,
                           "peak_flops": peak},
              "reference": REFERENCE if reference else None,
              "results": {impl.name: _summary(impl, batch_size * T, fpt, peak) for impl in impls}}
    if not reference:
        result["note"] = _no_reference_note()
    return _finish(result)


@torch.no_grad()
def bench_generate(config: GPTConfig, batch_size: int = 1, prompt_tokens: int = 32, new_tokens: int = 256,
                   rounds: int = 5, warmup: int = 2, device: str = "cpu", dtype: str = "auto",
                   compile: bool | None = None, reference: bool = True, reference_cache: str = "static",
                   reference_dtype: str | None = None, seed: int = 0, model: torch.nn.Module | None = None,
                   arch: str = "gpt") -> dict:
    """Greedy decoding tokens per second (prefill included) with the same weights in both: a random
    GPT of ``config``, or ``model`` (a run's decoder of family ``arch``)."""
    from lmforge.generate import generate_ids
    from lmforge.interop.hf import hf_family

    dev = torch.device(device)
    compile = dev.type == "cuda" if compile is None else compile
    dtypes = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32,
              "float32": torch.float32, "bfloat16": torch.bfloat16}
    wdtype = dtypes[dtype]
    ref_dtype = dtypes[reference_dtype or dtype]  # each may run in the dtype that is fastest for it
    if prompt_tokens + new_tokens > config.block_size:
        raise ValueError(f"prompt + new tokens ({prompt_tokens + new_tokens}) exceed block_size {config.block_size}")
    reference = reference and reference_available()
    torch.manual_seed(seed)
    if model is None:
        ours = GPT(config)
        # Random weights give near-uniform next-token distributions whose top two logits differ by
        # less than bf16 rounding, so greedy choices would flip between two correct implementations.
        # Sharpening the final norm (the residual stream is untouched) makes the comparison meaningful.
        ours.transformer.ln_f.weight.data.mul_(8.0)
    else:
        ours = model
    to_hf = hf_family(arch).to_hf
    ours = ours.to(device=dev, dtype=wdtype).eval()
    prompt = torch.randint(0, config.vocab_size, (batch_size, prompt_tokens), device=dev)

    def run_ours():
        return torch.stack(list(generate_ids(ours, prompt, new_tokens, temperature=0, compile=compile)), dim=1)

    impls = [_Impl(LMFORGE, run_ours, _bytes(ours.parameters()))]
    if reference:
        hf = to_hf(ours).to(ref_dtype)
        mask = torch.ones_like(prompt)

        def run_hf():
            out = hf.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              cache_implementation=reference_cache)
            return out[:, prompt_tokens:]

        impls.append(_Impl(REFERENCE, run_hf, _bytes(hf.parameters())))
    _rounds(impls, dev, warmup, rounds, 1, "bench generate")
    result = {"benchmark": "generate", **_environment(dev),
              "settings": {"arch": arch, "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
                           "block_size": config.block_size, "vocab_size": config.vocab_size,
                           "batch_size": batch_size, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                           "rounds": rounds, "warmup": warmup, "dtype": str(wdtype).replace("torch.", ""),
                           "compile": compile, "cuda_graph": dev.type == "cuda",
                           "reference_cache": reference_cache if reference else None,
                           "reference_dtype": str(ref_dtype).replace("torch.", "") if reference else None,
                           "params": ours.num_params()},
              "reference": REFERENCE if reference else None,
              "results": {impl.name: _summary(impl, batch_size * new_tokens, None, None) for impl in impls}}
    if reference:
        # Same weights, same tokens: checked in float32 (without TF32), where two correct
        # implementations agree exactly; in bf16 rounding can flip a close greedy choice, so the
        # timed runs' agreement is reported as information only.
        a, b = impls[0].outputs, impls[1].outputs
        result["timed_sequences_identical"] = round((a == b).all(dim=1).float().mean().item(), 4)
        result.update(_greedy_check(ours, prompt, min(new_tokens, 64), to_hf))
    else:
        result["note"] = _no_reference_note()
    return _finish(result)


def _no_reference_note() -> str:
    return ("reference disabled (--no-reference): lmforge alone" if reference_available()
            else "transformers is not installed: lmforge alone")


def _greedy_check(model, prompt: torch.Tensor, new_tokens: int, to_hf) -> dict:
    """Greedy tokens of lmforge and of its HF counterpart (``to_hf``) with the same weights, in float32."""
    import copy

    from lmforge.generate import generate_ids

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ours = copy.deepcopy(model).float()
        hf = to_hf(ours)
        a = torch.stack(list(generate_ids(ours, prompt, new_tokens, temperature=0, cuda_graph=False)), dim=1)
        b = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[:, prompt.size(1):]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    same = (a == b).all(dim=0)  # per position, over the batch
    return {"greedy_match": bool(same.all()), "greedy_check_tokens": new_tokens,
            "greedy_first_mismatch": None if same.all() else int((~same).nonzero()[0])}


def format_result(result: dict) -> str:
    """A small table: one line per implementation and the ratio."""
    s = result["settings"]
    lines = [f"bench {result['benchmark']} on {result['device_name']} ({result['device']}), torch {result['torch']}"
             + (f", transformers {result['transformers']}" if "transformers" in result else ""),
             "  " + ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("flops_per_token", "peak_flops"))]
    lines.append(f"  {'implementation':<16} {'median ms':>10} {'tokens/s':>12} {'MFU':>7} {'peak GB':>8}")
    for name, r in result["results"].items():
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        mem = f"{r['peak_memory_gb']:.3g}" if r.get("peak_memory_gb") is not None else "n/a"
        lines.append(f"  {name:<16} {r['median_step_ms']:>10.2f} {r['tokens_per_second']:>12,.0f} {mfu:>7} {mem:>8}")
    if result.get("ratio") is not None:
        lines.append(f"  ratio lmforge / {result['reference']}: {result['ratio']:.2f}x tokens/s")
    if "greedy_match" in result:
        lines.append(f"  greedy tokens (float32, {result['greedy_check_tokens']} per sequence): "
                     + ("identical" if result["greedy_match"] else
                        f"DIFFER from position {result['greedy_first_mismatch']}")
                     + f"; timed {result['settings']['dtype']} runs: "
                       f"{result['timed_sequences_identical']:.0%} of sequences identical")
    if result.get("note"):
        lines.append(f"  note: {result['note']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ serve
def bench_serve(run_dir: str, levels: list[int], requests: int = 16, max_tokens: int = 64,
                device: str = "auto", compile: bool = False) -> dict:
    """``lmforge serve`` as a subprocess on a free port, driven with streaming chat requests.

    For each concurrency level, ``requests`` requests (different prompts, greedy, the same at every
    level) are sent with at most that many in flight. Reports requests/s, generated tokens/s, time
    to first token and per-token latency (p50/p95), and the throughput of the highest level over
    level 1 (the same requests one after another).
    """
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from lmforge.serve.common import start_server
    from lmforge.device import resolve_device

    top = max(levels)
    proc, base = start_server(["serve", str(run_dir), "--max-concurrency", str(top), "--max-batch", str(top),
                               "--max-tokens-cap", str(max_tokens)] + (["--compile"] if compile else []),
                              env={"LMFORGE_API_KEY": ""}, timeout=900.0 if compile else 120.0)
    try:
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        topics = ["the weather", "a tokenizer", "training loss", "a file", "the library", "an error", "numbers",
                  "a class", "the network", "strings", "the data", "a test", "memory", "the answer", "time", "code"]

        def one(k: int) -> dict:
            body = {"model": model, "messages": [{"role": "user", "content": f"Tell me about {topics[k % 16]} ({k})."}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0, first, last, tokens = time.perf_counter(), None, None, 0
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if any(c["delta"].get("content") for c in chunk["choices"]):
                        last = time.perf_counter()
                        first = first or last
            first = first or time.perf_counter()
            return {"ttft": first - t0, "per_token": (last - first) / (tokens - 1) if last and tokens > 1 else None,
                    "tokens": tokens}

        one(0)  # warm-up (first allocations, page-in)
        results = {}
        for c in levels:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=c) as pool:
                done = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - t0
            ttft = [d["ttft"] * 1e3 for d in done]
            per_token = [d["per_token"] * 1e3 for d in done if d["per_token"] is not None]
            tokens = sum(d["tokens"] for d in done)
            results[str(c)] = {"concurrency": c, "requests": requests, "seconds": wall,
                               "requests_per_second": requests / wall, "tokens_per_second": tokens / wall,
                               "generated_tokens": tokens,
                               "ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p95": float(np.percentile(ttft, 95)),
                               "per_token_ms_p50": float(np.percentile(per_token, 50)) if per_token else None,
                               "per_token_ms_p95": float(np.percentile(per_token, 95)) if per_token else None}
            print(f"[lmforge] bench serve: concurrency {c}: {requests / wall:.2f} req/s, {tokens / wall:,.0f} tokens/s",
                  file=sys.stderr, flush=True)
        metrics = httpx.get(base + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rows_max = [float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith("lmforge_decode_batch_rows_max ")]
    out = {"benchmark": "serve", **_environment(resolve_device(device)), "run_dir": str(run_dir),
           "settings": {"levels": levels, "requests": requests, "max_tokens": max_tokens, "temperature": 0,
                        "compile": compile},
           "results": results, "max_rows_decoded_together": rows_max[0] if rows_max else None}
    if 1 in levels and top > 1:
        out["speedup"] = results[str(top)]["tokens_per_second"] / results["1"]["tokens_per_second"]
        out["speedup_of"] = f"{top} concurrent over {requests} sequential requests (generated tokens/s)"
    return out


def format_serve_result(result: dict) -> str:
    lines = [f"bench serve on {result['device_name']} ({result['device']}), torch {result['torch']}: "
             f"{result['settings']['requests']} requests of up to {result['settings']['max_tokens']} tokens per level",
             f"  {'concurrency':>11} {'req/s':>8} {'tokens/s':>10} {'TTFT p50/p95 ms':>18} {'per-token p50/p95 ms':>22}"]
    for r in result["results"].values():
        pt = (f"{r['per_token_ms_p50']:.1f} / {r['per_token_ms_p95']:.1f}" if r["per_token_ms_p50"] is not None else "n/a")
        lines.append(f"  {r['concurrency']:>11} {r['requests_per_second']:>8.2f} {r['tokens_per_second']:>10,.0f} "
                     f"{r['ttft_ms_p50']:>8.0f} / {r['ttft_ms_p95']:<7.0f} {pt:>22}")
    if "speedup" in result:
        lines.append(f"  speed-up, {result['speedup_of']}: {result['speedup']:.2f}x")
    return "\n".join(lines)
