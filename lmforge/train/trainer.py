"""The training loop. One loop for every task; tasks plug in a batch builder and a loss.

Reproducibility contract (CPU): batches are a function of (seed, step), the learning rate is a
function of step, and checkpoints carry optimizer and RNG state, so N steps + ``--resume`` + M
steps gives bitwise the losses of N + M uninterrupted steps.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lmforge import config as cfgmod
from lmforge.chat import save_chat_template
from lmforge.data.tokens import TokenFile, load_meta
from lmforge.errors import UserError
from lmforge.models.gpt import GPT
from lmforge.progress import progress, status
from lmforge.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.distributed import (World, accumulating, gather_state, is_sharded, load_optimizer_state, setup,
                                       shard, teardown, world_from_env, wrap)
from lmforge.train.optim import build_optimizer, lr_at, set_lr

CALIBRATION_STEPS = 8  # steps timed to plan max_steps from a time budget (after WARM_STEPS)
WARM_STEPS = 2  # first steps are slow (allocator, kernel selection) and are not timed
REPLAN_AT = (0.2, 0.4, 0.6, 0.8)  # fractions of the time budget at which the plan is revised


class TimeBudget:
    """Plans a schedule's length (``max_steps``) so that it ends with a time budget.

    Call :meth:`plan` after every step while :attr:`active`. The first plan comes from
    ``CALIBRATION_STEPS`` timed steps after ``WARM_STEPS`` untimed ones; it is revised at each
    ``REPLAN_AT`` fraction of the budget from the speed over the stretch since the last plan
    (evaluations included), so the learning-rate schedule still ends with the budget when the
    machine's speed changes. ``cap`` bounds every plan (a planned number of epochs that may fit).
    """

    def __init__(self, seconds: float, t0: float, start_step: int = 0, cap: int | None = None):
        self.seconds, self.t0, self.start, self.cap = seconds, t0, start_step, cap
        self.replan_at = list(REPLAN_AT)
        self.mark: tuple[float, int] | None = None  # (time, step) the speed is measured from
        self.per_step: float | None = None  # seconds per step behind the last plan; None: none yet

    @property
    def active(self) -> bool:
        return bool(self.replan_at)

    def plan(self, step: int, now: float, first_factor: float = 1.0) -> int | None:
        """After ``step`` steps at time ``now``: a new ``max_steps``, or None when it is not time to
        plan. ``first_factor`` scales the first estimate of the time per step (for evaluations that
        the calibration steps did not include)."""
        n = step - self.start
        if n == WARM_STEPS:
            self.mark = (now, step)
        planned = self.per_step is not None
        first = not planned and n == WARM_STEPS + CALIBRATION_STEPS
        if self.mark is None or step == self.mark[1] or not (
                first or (planned and now - self.t0 >= self.replan_at[0] * self.seconds)):
            return None
        self.per_step = (now - self.mark[0]) / (step - self.mark[1]) * (first_factor if first else 1.0)
        steps = step + max(1, int(0.98 * (self.seconds - (now - self.t0)) / self.per_step))
        self.mark = (now, step)
        while self.replan_at and now - self.t0 >= self.replan_at[0] * self.seconds:
            self.replan_at.pop(0)
        return min(steps, self.cap) if self.cap is not None else steps


# Dense bf16 peak of known accelerators, for MFU (per device, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless asked."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the embedding table up to a multiple of 64: faster matmuls, unused rows never targeted."""
    return int(math.ceil(n / multiple) * multiple)


class _StopFlag:
    """First Ctrl-C asks the loop to stop at the next step boundary (and checkpoint); a second one
    interrupts immediately."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _log(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class Objective:
    """What one batch costs: next-token loss for decoders, masked-token loss for encoders.

    Batches are a pure function of (seed, step, micro-batch, stream), so resuming reproduces them.
    """

    def __init__(self, cfg: cfgmod.RunConfig, meta: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        self.T = cfg.model.block_size
        self.mlm = cfg.arch == "bert"
        self.loss_chunk = cfgmod.loss_chunk_for(cfg.train.loss_chunk, device.type)
        if self.mlm:
            self.special = meta.get("special_ids") or {}
            missing = [t for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if t not in self.special]
            if missing:
                raise UserError(f"masked-LM training needs a WordPiece data directory (`lmforge prepare "
                                f"--tokenizer wordpiece`); this tokenizer lacks {', '.join(missing)}")
            self.vocab = meta["vocab_size"]

    def batch(self, data: TokenFile, step: int, micro: int, stream: int = 0, batch_size: int | None = None):
        t = self.cfg.train
        B = batch_size or t.batch_size
        if self.mlm:
            from lmforge.train.mlm import mlm_batch

            x, y = mlm_batch(data, B, self.T, t.seed, step, micro, stream, self.special, self.vocab)
        else:
            x, y = data.random_batch(B, self.T, t.seed, step, micro, stream)
        if self.device.type == "cuda":  # pinned pages: the copy runs asynchronously
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(self, model, x, y) -> torch.Tensor:
        return self.loss_and_accuracy(model, x, y)[0]

    def loss_and_accuracy(self, model, x, y):
        """(loss, masked-token accuracy or None)."""
        if self.mlm:
            from lmforge.train.mlm import mlm_loss

            return mlm_loss(model, x, y)
        return model(x, y, loss_chunk=self.loss_chunk)[1], None


@torch.no_grad()
def estimate_val(model, val: TokenFile, cfg: cfgmod.RunConfig, ctx, objective: Objective,
                 batches: int | None = None) -> dict:
    """Mean loss (and, for masked-LM, masked-token accuracy) on fixed random validation batches
    (the same ones every time)."""
    model.eval()
    losses, accs = [], []
    for i in range(batches or cfg.train.eval_batches):
        x, y = objective.batch(val, step=0, micro=i, stream=1)
        with ctx:
            loss, acc = objective.loss_and_accuracy(model, x, y)
        losses.append(loss.item())
        if acc is not None:
            accs.append(acc.item())
    model.train()
    out = {"val_loss": sum(losses) / len(losses)}
    if accs:
        out["val_mlm_accuracy"] = sum(accs) / len(accs)
    return out


def build_model(cfg: cfgmod.RunConfig):
    from lmforge.models.bert import Bert

    return Bert(cfg.model) if cfg.arch == "bert" else GPT(cfg.model)


def train(cfg: cfgmod.RunConfig, data_dir: str | Path, run_dir: str | Path, resume: bool = False,
          stop_at: int | None = None) -> dict:
    """Train (or resume) a GPT on a prepared data directory; returns a summary dict.

    ``stop_at`` ends this invocation after that many steps (with a checkpoint) without changing
    the schedule, so a later ``--resume`` continues the same run.
    """
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    if cfg.train.label_smoothing:
        raise UserError("train.label_smoothing applies to --task classify only")
    meta = load_meta(data_dir)
    train_data = TokenFile(data_dir / "train.bin", meta["dtype"])
    val_data = TokenFile(data_dir / "val.bin", meta["dtype"])
    for tf in (train_data, val_data):
        tf.check_context(cfg.model.block_size)
    tokenizer_vocab = meta["vocab_size"]
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = pad_vocab(tokenizer_vocab)
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise UserError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}")
    if resume and not has_checkpoint(run_dir):
        raise UserError(f"--resume: no checkpoint in {run_dir}")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run directory {run_dir} is not empty; use --resume to continue it or choose another --out")
    world = world_from_env()
    device = setup(world, resolve_device(cfg.train.device))
    try:
        return _train(cfg, meta, train_data, val_data, data_dir, run_dir, resume, stop_at, world, device)
    finally:
        teardown(world)


def _train(cfg, meta, train_data, val_data, data_dir, run_dir, resume, stop_at, world, device) -> dict:
    t = cfg.train
    if device.type == "cuda":  # TF32 for the float32 matmuls that autocast leaves (Ampere and later)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(t.seed)
    model = build_model(cfg).to(device)
    sharded = world.active and t.fsdp  # the optimizer is built on the shards, after sharding

    def make_optimizer():
        return build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device.type, t.optimizer,
                               t.muon_lr, t.layer_lr_decay)
    optimizer = None if sharded else make_optimizer()
    state = {"step": 0, "tokens_seen": 0, "train_seconds": 0.0, "data_dir": str(data_dir.resolve())}
    created = False
    world.barrier()  # every process has checked the run directory before process 0 writes to it
    if resume:
        state = load_checkpoint(run_dir, model, optimizer)
        if world.main:
            status(f"resuming {run_dir} at step {state['step']}")
    elif world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        created = True
        shutil.copyfile(data_dir / "tokenizer.json", run_dir / "tokenizer.json")
        (run_dir / "metrics.jsonl").write_text("")
        if cfg.arch == "gpt":
            save_chat_template(run_dir)
    world.barrier()
    if sharded:
        shard(model)
        optimizer = make_optimizer()
        if resume:
            load_optimizer_state(model, optimizer, state.pop("optimizer_state"))
    try:
        return _loop(cfg, model, optimizer, state, train_data, val_data, run_dir, device, stop_at,
                     Objective(cfg, meta, device), world)
    except BaseException:
        if created and not has_checkpoint(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # no half-written run directory
        raise


def _loop(cfg, model, optimizer, state, train_data, val_data, run_dir, device, stop_at, objective,
          world: World) -> dict:
    t = cfg.train
    B, T, accum = t.batch_size, cfg.model.block_size, t.grad_accum
    tokens_per_step = B * T * accum * world.size
    ctx = autocast_for(device, t.dtype)
    model.activation_checkpointing = t.activation_checkpointing
    use_compile = t.compile if t.compile is not None else device.type == "cuda"
    trained = wrap(model, world, device)  # DDP under torchrun; the model itself otherwise
    fwd = torch.compile(trained) if use_compile else trained
    peak = peak_flops(device)
    flops_per_step = model.flops_per_token(T) * tokens_per_step / world.size  # per device, for MFU
    params = model.num_params()
    say = status if world.main else (lambda message: None)
    if world.main:
        cfgmod.save(cfg, run_dir / "config.yaml")
    say(f"model: {params:,} parameters on {device}" + (f" x {world.size} processes" if world.active else "")
        + f"; {tokens_per_step:,} tokens per step")

    start_step, step = state["step"], state["step"]
    max_steps = t.max_steps
    if stop_at is not None and max_steps is not None and stop_at > max_steps:
        raise UserError(f"--stop-at {stop_at} is past train.max_steps {max_steps}")
    session_t0 = time.perf_counter()
    seconds_before = state.get("train_seconds", 0.0)
    # A schedule still to be planned from max_seconds (each plan is saved: --resume replays it).
    budget = (TimeBudget(t.max_seconds, session_t0, start_step)
              if max_steps is None and t.max_seconds is not None else None)

    def checkpoint() -> None:
        state["step"] = step
        state["train_seconds"] = round(seconds_before + time.perf_counter() - session_t0, 3)
        gathered = gather_state(model, optimizer) if is_sharded(model) else (None, None)  # all processes
        if world.main:
            save_checkpoint(run_dir, model, optimizer, state, *gathered)
        world.barrier()

    last_val, last_extra = None, {}
    interval_loss, interval_steps = torch.zeros((), device=device), 0
    interval_t0 = time.perf_counter()
    bar = progress(total=max_steps, initial=step, desc="training", unit="step", disable=None if world.main else True)
    model.train()
    reason = "max_steps"
    with _StopFlag() as stop:
        while True:
            if max_steps is not None and step >= max_steps:
                break
            if stop_at is not None and step >= stop_at:
                reason = "stop_at"
                break
            elapsed, interrupted = world.sync(time.perf_counter() - session_t0, stop.requested, device)
            if t.max_seconds is not None and elapsed >= t.max_seconds:
                reason = "max_seconds"
                break
            if interrupted:  # Ctrl-C here or in another process: all stop at the same step
                reason = "interrupted"
                break

            lr = lr_at(step, t.lr, t.warmup_steps, max_steps, t.min_lr_ratio)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                # Process r takes micro-batches r*A..r*A+A-1: W processes = one with W*A.
                x, y = objective.batch(train_data, step, world.rank * accum + micro)
                # Gradients are averaged across processes once per step, after the last micro-batch.
                with accumulating(trained, world, last=micro == accum - 1), ctx:
                    loss = objective.loss(fwd, x, y)
                    (loss / accum).backward()
                loss_sum += loss.detach()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                         if t.grad_clip > 0 else None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["tokens_seen"] += tokens_per_step

            if budget is not None and budget.active:  # process 0's clock decides for all
                now = session_t0 + world.sync(time.perf_counter() - session_t0, False, device)[0]
                eval_share = t.eval_batches / (3 * accum * t.eval_interval) if t.eval_interval else 0.0
                planned = budget.plan(step, now, first_factor=1 + eval_share)
                if planned is not None:
                    max_steps = t.max_steps = planned
                    if world.main:
                        cfgmod.save(cfg, run_dir / "config.yaml")
                    bar.reset(total=max_steps)
                    bar.update(step)
                    say(f"planned {max_steps} steps to fit {t.max_seconds:.0f} s "
                        f"({budget.per_step * 1000:.0f} ms/step)")

            interval_loss += loss_sum
            interval_steps += 1
            if step % t.log_interval == 0 or step == max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - interval_t0) / interval_steps  # seconds per step
                # Mean training loss over the steps since the last line, not one noisy batch.
                record = {"step": step, "tokens": state["tokens_seen"],
                          "loss": world.mean(interval_loss).item() / (accum * interval_steps),
                          "lr": lr, "tokens_per_second": round(tokens_per_step / dt, 1)}
                if grad_norm is not None:  # a DTensor when sharded
                    record["grad_norm"] = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                           else grad_norm).item()
                postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{lr:.2e}",
                           "tok/s": f"{record['tokens_per_second']:,.0f}"}
                if peak:
                    record["mfu"] = round(flops_per_step / dt / peak, 4)
                    postfix["mfu"] = f"{record['mfu']:.1%}"
                if world.main:
                    _log(run_dir, record)
                bar.set_postfix(postfix, refresh=False)
                interval_loss, interval_steps = torch.zeros((), device=device), 0
            if t.eval_interval and step % t.eval_interval == 0 and step != max_steps:
                val = estimate_val(model, val_data, cfg, ctx, objective)  # the same batches everywhere
                last_val = val["val_loss"]
                if world.main:
                    _log(run_dir, {"step": step, "tokens": state["tokens_seen"], **val})
                if bar.disable:  # no bar (stderr is not a terminal): leave a line in the log instead
                    say(f"step {step}/{max_steps or '?'}: val_loss {last_val:.4f}, "
                           f"{state['tokens_seen']:,} tokens, {time.perf_counter() - session_t0:.0f} s")
            if t.checkpoint_interval and step % t.checkpoint_interval == 0:
                checkpoint()
            if step % t.log_interval == 0:
                interval_t0 = time.perf_counter()  # throughput excludes evaluation and checkpoints
            bar.update(1)
    bar.close()

    if step > start_step:
        val = estimate_val(model, val_data, cfg, ctx, objective)
        last_val = val["val_loss"]
        if world.main:
            _log(run_dir, {"step": step, "tokens": state["tokens_seen"], **val})
        last_extra = {k: v for k, v in val.items() if k != "val_loss"}
    checkpoint()
    if world.main:
        from lmforge.evaluate.report import plot_loss

        plot_loss(run_dir)
    seconds = time.perf_counter() - session_t0
    tokens_this_session = (step - start_step) * tokens_per_step
    return {
        "run_dir": str(run_dir), "step": step, "max_steps": max_steps, "stopped_by": reason,
        "tokens_seen": state["tokens_seen"], "params": params, "val_loss": last_val, **last_extra,
        "seconds": round(seconds, 2), "tokens_per_second": round(tokens_this_session / max(seconds, 1e-9), 1),
        "device": str(device), "processes": world.size, "rank": world.rank,
    }

