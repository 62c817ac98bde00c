"""Correctness of lmforge's CUDA paths, run on a GPU machine (CI has none): prints PASS/FAIL lines.

    PYTHONPATH=. python3 bench/gpu_check.py
"""

from __future__ import annotations

import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmforge.generate import generate_ids
from lmforge.models.gpt import GPT, GPTConfig

dev = torch.device("cuda")
failures = 0


def check(name: str, ok: bool, detail: str = "") -> None:
    global failures
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


torch.manual_seed(0)
small = GPT(GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=128)).to(dev).eval()
prompt = torch.randint(0, 512, (3, 9), device=dev)
ref = torch.stack(list(generate_ids(small, prompt, 60, temperature=0, use_cache=False)), 1)
graph = torch.stack(list(generate_ids(small, prompt, 60, temperature=0)), 1)
check("fp32 greedy: CUDA-graph decode == no-cache", torch.equal(ref, graph))
again = torch.stack(list(generate_ids(small, prompt, 60, temperature=0)), 1)
check("fp32 greedy: reused graph == first call", torch.equal(again, graph))
comp = torch.stack(list(generate_ids(small, prompt, 60, temperature=0, compile=True)), 1)
check("fp32 greedy: compiled + graph decode == no-cache", torch.equal(ref, comp))
long = torch.stack(list(generate_ids(small, prompt, 200, temperature=0)), 1)
check("decode past the context keeps going", long.shape == (3, 200))
g1 = torch.Generator(device=dev).manual_seed(5)
g2 = torch.Generator(device=dev).manual_seed(5)
s1 = torch.stack(list(generate_ids(small, prompt, 40, temperature=1.0, top_p=0.9, generator=g1)), 1)
s2 = torch.stack(list(generate_ids(small, prompt, 40, temperature=1.0, top_p=0.9, generator=g2)), 1)
check("seeded sampling reproducible with graphs", torch.equal(s1, s2))

# Same weights in HF GPT-2: logits agree in fp32 (TF32 off) and in bf16.
from lmforge.interop.hf import to_hf_gpt2  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
big = GPT(cfg).to(dev).eval()
hf = to_hf_gpt2(big)
x = torch.randint(0, 50304, (2, 256), device=dev)
with torch.no_grad():
    a, b = big(x)[0].double(), hf(x).logits.double()
rel = ((a - b).norm() / b.norm()).item()
check("GPT-2 124M fp32 logits vs HF", rel < 1e-5, f"rel err {rel:.2e}")
with torch.no_grad():
    big16, hf16 = big.to(torch.bfloat16), hf.to(torch.bfloat16)
    a, b = big16(x)[0].double(), hf16(x).logits.double()
rel = ((a - b).norm() / b.norm()).item()
check("GPT-2 124M bf16 logits vs HF", rel < 2e-2, f"rel err {rel:.2e}")

# Training: flash attention is the kernel that runs (forcing it must not fail), compiled == eager.
torch.backends.cuda.matmul.allow_tf32 = True
model = GPT(GPTConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256)).to(dev)
xb = torch.randint(0, 8192, (8, 257), device=dev)
try:
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(xb[:, :-1], xb[:, 1:], loss_chunk=0)
        loss.backward()
    check("flash-attention backend runs forward+backward (bf16)", True)
except RuntimeError as e:
    check("flash-attention backend runs forward+backward (bf16)", False, str(e).splitlines()[0])
model.zero_grad()
losses = {}
for name, fwd in (("eager", model), ("compiled", torch.compile(model))):
    for chunk in (0, 4096):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(xb[:, :-1], xb[:, 1:], loss_chunk=chunk)
        loss.backward()
        gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters())).item()
        model.zero_grad()
        losses[(name, chunk)] = (loss.item(), gn)
base = losses[("eager", 0)]
for k, (l, gn) in losses.items():
    check(f"train step {k} loss/grad-norm vs eager full-logits", abs(l - base[0]) < 1e-2 * base[0]
          and abs(gn - base[1]) < 3e-2 * base[1], f"loss {l:.5f} vs {base[0]:.5f}, |g| {gn:.4f} vs {base[1]:.4f}")
model.activation_checkpointing = True
model.train()
with torch.autocast("cuda", dtype=torch.bfloat16):
    _, loss = model(xb[:, :-1], xb[:, 1:], loss_chunk=0)
loss.backward()
gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters())).item()
check("activation checkpointing: same loss and grad norm", abs(loss.item() - base[0]) < 1e-3 * base[0]
      and abs(gn - base[1]) < 1e-2 * base[1], f"loss {loss.item():.5f}, |g| {gn:.4f}")
print("gpu_check:", "all passed" if not failures else f"{failures} FAILED")
sys.exit(1 if failures else 0)
