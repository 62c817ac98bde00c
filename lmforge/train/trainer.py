"""The training loop. One loop for every task; tasks plug in data, batches, a loss and an
evaluation (``tasks/base.py``), and the loop does the rest: devices and processes (DDP/FSDP),
optimizer and schedule, gradient accumulation and clipping, a time budget, logging
(``metrics.jsonl``, TensorBoard), checkpoints (periodic, at the end, on Ctrl-C), and the hooks any
task can use — early stopping and keeping the best checkpoint (``train.early_stop``,
``train.patience``, ``train.keep_best``).

Reproducibility contract (CPU): batches are a function of (seed, step), the learning rate is a
function of step, and checkpoints carry optimizer, RNG and hook state, so N steps + ``--resume`` +
M steps gives bitwise the losses of N + M uninterrupted steps.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch

from lmforge import config as cfgmod
from lmforge.device import autocast_for, compile_fn, peak_flops, resolve_device
from lmforge.errors import UserError
from lmforge.fsutil import write_json
from lmforge.progress import progress, status
from lmforge.runs import RunDir
from lmforge.tasks import TASKS
from lmforge.models.lora import apply_lora
from lmforge.train.adapters import AdapterStore
from lmforge.train.checkpoint import (load_checkpoint, load_model_state, recover_checkpoint, save_checkpoint,
                                     save_model)
from lmforge.train.distributed import (World, accumulating, gather_state, is_sharded, load_optimizer_state, setup,
                                       shard, teardown, world_from_env, wrap)
from lmforge.train.metrics_log import MetricsLog
from lmforge.train.optim import Optimizers, build_optimizer, lr_at, set_lr

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


class BestTracker:
    """Early stopping and best-checkpoint selection on one validation metric (``val_<metric>``;
    better when lower if ``lower``, else higher). Its state is part of the checkpoint."""

    def __init__(self, metric: str | None, patience: int, keep_best: bool, saved: dict | None = None,
                 lower: bool = False):
        self.metric, self.patience, self.keep_best, self.lower = metric, patience, keep_best, lower
        saved = saved or {}
        self.score, self.step, self.bad = saved.get("score"), saved.get("step"), saved.get("bad_evals", 0)

    def state(self) -> dict:
        return {"score": self.score, "step": self.step, "bad_evals": self.bad}

    def update(self, step: int, val: dict) -> tuple[bool, bool]:
        """After an evaluation at ``step``: (a new best, time to stop early)."""
        if self.metric is None or f"val_{self.metric}" not in val:
            return False, False
        value = val[f"val_{self.metric}"]
        score = None if value is None else -value if self.lower else value  # None (e.g. no ROC-AUC): never a best
        if score is not None and (self.score is None or score > self.score):
            self.score, self.step, self.bad = score, step, 0
            return True, False
        self.bad += 1
        return False, bool(self.patience) and self.bad >= self.patience


def train(cfg: cfgmod.RunConfig, data_dir: str | Path | None = None, run_dir: str | Path | None = None,
          resume: bool = False, stop_at: int | None = None, start: dict | None = None, penalty=None,
          reports: bool = True) -> dict:
    """Train (or resume) ``cfg``'s task into ``run_dir``; returns a summary dict.

    ``data_dir`` sets ``data.path``. ``stop_at`` ends this invocation after that many steps (with
    a checkpoint) without changing the schedule, so a later ``--resume`` continues the same run.
    A caller that trains in rounds (federated clients, ``federate/``) passes ``start`` (weights in
    the run directory's form, loaded over the task's model), ``penalty`` (``model -> scalar``
    added to every loss, e.g. FedProx's proximal term) and ``reports=False`` (no final plots or
    reports: the round's weights are what it wants).
    """
    if run_dir is None:
        raise UserError("a run directory is required (--out)")
    if stop_at is not None and stop_at <= 0:
        raise UserError(f"--stop-at must be a positive step, got {stop_at}")
    if penalty is not None and cfg.train.dp.epsilon is not None:
        raise UserError("train.dp clips each example's gradient; a penalty on the weights (FedProx's proximal "
                        "term) would escape the clipping: use it without train.dp")
    if data_dir is not None:
        cfg = cfgmod.replace(cfg, data={"path": str(data_dir)})
    run = RunDir(run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        recover_checkpoint(run.path)  # finish a checkpoint a kill interrupted after its commit
    if resume and not run.has_checkpoint():
        if run.is_aborted_start():
            raise UserError(f"--resume: {run_dir} stopped before its first checkpoint, so there is nothing to "
                            "resume; run the same command without --resume to start it again")
        raise UserError(f"--resume: no checkpoint in {run_dir}")
    if not resume and run.is_aborted_start():
        status(f"{run_dir} holds a start that stopped before its first checkpoint: starting it again")
        for f in run.path.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    elif not resume and not run.is_empty():
        raise UserError(f"run directory {run_dir} is not empty; use --resume to continue it or choose another --out")
    task = TASKS[cfg.task.name](cfg, run if resume else None)  # reads and checks the data
    world = world_from_env()
    cfg = task.resolve(cfg, world)
    cfgmod.validate(cfg)
    task.cfg = cfg
    device = setup(world, resolve_device(cfg.train.device))
    try:
        return _train(cfg, task, run, resume, stop_at, world, device, start, penalty, reports)
    finally:
        teardown(world)


def _train(cfg, task, run: RunDir, resume, stop_at, world: World, device, start=None, penalty=None,
           reports=True) -> dict:
    t = cfg.train
    if device.type == "cuda":  # TF32 for the float32 matmuls that autocast leaves (Ampere and later)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(t.seed)
    model = task.build_model(cfg)
    adapters = apply_lora(model, cfg.finetune.lora)  # {} without LoRA; on --resume, before the checkpoint loads
    if t.dp.epsilon is not None:
        from lmforge.train.privacy import per_example_ready

        per_example_ready(model)  # layers swapped before the optimizer holds their parameters
    if start is not None:
        from lmforge.train.checkpoint import load_into

        load_into(model, start, "the starting weights")
    if adapters and world.main:
        status(f"LoRA r={cfg.finetune.lora.r} on {adapters['lora_layers']} layers: {adapters['trainable_params']:,} "
               f"trainable of {adapters['total_params']:,} parameters")
    model = model.to(device)
    sharded = world.active and t.fsdp  # the optimizer is built on the shards, after sharding

    phases = task.phases(model)
    if len(phases) > 1 and world.active:
        raise UserError(f"the {cfg.task.name} task trains in one process (its phases update different parts "
                        "of the model in turn)")

    def make_optimizer():  # one per phase; saved and scheduled as one
        optimizers = [build_optimizer(module, t.lr, t.weight_decay, (t.beta1, t.beta2), device.type, t.optimizer,
                                      t.muon_lr, t.layer_lr_decay, t.momentum, t.nesterov) for _, module in phases]
        return optimizers[0] if len(optimizers) == 1 else Optimizers(*optimizers)
    optimizer = None if sharded else make_optimizer()
    private = None
    if t.dp.epsilon is not None:  # DP-SGD: the optimizer clips each example's gradient and adds noise
        from lmforge.train.privacy import PrivateTraining, check_run

        check_run(cfg, task, world, use_compile=bool(t.compile))
        planned = t.max_steps or task.step_cap
        if planned is None:
            raise UserError("train.dp plans its noise for a number of steps: set train.max_steps (or, for the tasks "
                            "trained in epochs, task.epochs beside the time budget)")
        planned *= t.dp.rounds
        private = PrivateTraining(model, optimizer, t.dp, task.sample_rate, planned, task.B)
        optimizer = private.optimizer
        if world.main:
            status(f"differential privacy: epsilon {t.dp.epsilon} at delta {t.dp.delta} over {planned} steps -> "
                   f"noise multiplier {private.noise_multiplier:.3f}, sample rate {task.sample_rate:.4f}, "
                   f"per-example clipping at {t.dp.max_grad_norm}")
    state = {"step": 0, f"{task.unit}_seen": 0, "train_seconds": 0.0}
    created = False
    world.barrier()  # every process has checked the run directory before process 0 writes to it
    if resume:
        state = load_checkpoint(run.path, model, optimizer)
        if world.main:
            status(f"resuming {run} at step {state['step']}")
            if state.get("model_step", state["step"]) != state["step"] and not (run / run.BEST).is_file():
                shutil.copyfile(run.model, run / run.BEST)  # the kept best weights stay the best so far
    elif world.main:
        run.path.mkdir(parents=True, exist_ok=True)
        created = True
        task.write_files(run, model)
        run.metrics.write_text("")
    world.barrier()
    if sharded:
        shard(model)
        optimizer = make_optimizer()
        if resume:
            load_optimizer_state(model, optimizer, state.pop("optimizer_state"))
    task.to(device)
    try:
        return _loop(cfg, task, model, optimizer, state, run, device, stop_at, world, phases, private, penalty,
                     reports)
    except BaseException:
        if created and not run.has_checkpoint():
            shutil.rmtree(run.path, ignore_errors=True)  # no half-written run directory
        raise


def _loop(cfg, task, model, optimizer, state, run: RunDir, device, stop_at, world: World, phases: list,
          private=None, penalty=None, reports=True) -> dict:
    t = cfg.train
    accum, unit = t.grad_accum, task.unit
    units_per_step = task.units_per_step(cfg, world)
    ctx = autocast_for(device, t.dtype)
    model.activation_checkpointing = t.activation_checkpointing
    use_compile = t.compile if t.compile is not None else device.type == "cuda" and private is None
    trained, call = wrap(model, world, device, task.method)  # DDP under torchrun; the model itself otherwise
    fwd = compile_fn(call) if use_compile else call
    peak = peak_flops(device) if unit == "tokens" else None
    if peak:
        flops_per_step = model.flops_per_token(cfg.model.block_size) * units_per_step / world.size  # per device
    params = model.num_params()
    say = status if world.main else (lambda message: None)
    log = MetricsLog(run.path, t.tensorboard, enabled=world.main)
    log.truncate(state["step"])  # on --resume: the steps after the checkpoint are logged again
    store = AdapterStore.of(cfg)  # a LoRA run with a base saves its adapters alone
    if world.main:
        cfgmod.save(cfg, run.config)
    say(f"model: {params:,} parameters on {device}" + (f" x {world.size} processes" if world.active else "")
        + f"; {units_per_step:,} {unit} per step")

    start_step, step = state["step"], state["step"]
    max_steps = t.max_steps
    if stop_at is not None and max_steps is not None and stop_at > max_steps:
        raise UserError(f"--stop-at {stop_at} is past train.max_steps {max_steps}")
    session_t0 = time.perf_counter()
    seconds_before = state.get("train_seconds", 0.0)
    # A schedule still to be planned from max_seconds (each plan is saved: --resume replays it).
    budget = (TimeBudget(t.max_seconds, session_t0, start_step, cap=task.step_cap)
              if max_steps is None and t.max_seconds is not None else None)
    tracker = BestTracker(t.early_stop, t.patience, t.keep_best, state.get("best"),
                          lower=t.early_stop in task.LOWER_IS_BETTER)
    seen = f"{unit}_seen"

    def gathered_weights() -> dict | None:
        full = gather_state(model, optimizer)[0] if is_sharded(model) else None  # all processes call
        return store.state(model, full) if store is not None else full

    def checkpoint(model_step: int | None = None, model_file: Path | None = None) -> None:
        state["step"], state["model_step"] = step, step if model_step is None else model_step
        state["best"] = tracker.state()
        state["train_seconds"] = round(seconds_before + time.perf_counter() - session_t0, 3)
        weights, optimizer_state = gather_state(model, optimizer) if is_sharded(model) else (None, None)  # all
        if store is not None:
            weights = store.state(model, weights)
        if world.main:
            save_checkpoint(run.path, model, optimizer, state, weights, optimizer_state, model_file=model_file,
                            model_metadata=store.metadata if store is not None else None)
        world.barrier()

    def evaluate() -> dict:
        val = task.evaluate(model, ctx)  # the same figures on every process
        if private is not None:
            val["dp_epsilon"] = private.epsilon(step)  # spent so far
        if val and world.main:
            log.write({"step": step, unit: state[seen], **val})
        return val

    def observe(val: dict) -> bool:
        """Feed an evaluation to the hooks; True when training should stop early."""
        improved, stop_early = tracker.update(step, val)
        if improved and tracker.keep_best:
            weights = gathered_weights()
            if world.main:
                save_model(model, run / run.BEST, state=weights, metadata={
                    "step": str(step), "format": "lmforge", **(store.metadata if store is not None else {})})
        return stop_early

    last_val, last_eval_step = {}, None
    phase_optimizers = optimizer.optimizers if len(phases) > 1 else [optimizer]
    interval_loss, interval_steps = torch.zeros(len(phases), device=device), 0
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

            lr = lr_at(step, t.lr, t.warmup_steps, max_steps, t.min_lr_ratio, t.schedule, tuple(t.lr_milestones),
                       t.lr_gamma)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros(len(phases), device=device)  # per phase
            batches = []
            for micro in range(accum):
                # Process r takes micro-batches r*A..r*A+A-1: W processes = one with W*A.
                batch = task.batch(step, world.rank * accum + micro)
                if device.type == "cuda":  # pinned pages: the copy runs asynchronously
                    batch = tuple(b.pin_memory() for b in batch)
                batches.append(tuple(b.to(device, non_blocking=True) for b in batch))
            grad_norms = []
            for i, ((name, module), phase_optimizer) in enumerate(zip(phases, phase_optimizers)):
                for micro, batch in enumerate(batches):
                    # Gradients are averaged across processes once per step, after the last micro-batch.
                    with accumulating(trained, world, last=micro == accum - 1), ctx:
                        loss = task.phase_loss(fwd, model, batch, name)
                        if penalty is not None:
                            loss = loss + penalty(model)
                        (loss / accum).backward()
                    loss_sum[i] += loss.detach()
                # (Under DP the optimizer clips each example's gradient instead.)
                grad_norms.append(torch.nn.utils.clip_grad_norm_(module.parameters(), t.grad_clip)
                                  if t.grad_clip > 0 and private is None else None)
                phase_optimizer.step()
                phase_optimizer.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)  # also what this phase's loss left on other phases' parts
            step += 1
            state[seen] += units_per_step

            if budget is not None and budget.active:  # process 0's clock decides for all
                now = session_t0 + world.sync(time.perf_counter() - session_t0, False, device)[0]
                eval_share = task.eval_cost(cfg) / t.eval_interval if t.eval_interval else 0.0
                planned = budget.plan(step, now, first_factor=1 + eval_share)
                if planned is not None and planned != max_steps:
                    max_steps = max(planned, step)
                    cfg = cfgmod.replace(cfg, train={"max_steps": max_steps})
                    if world.main:
                        cfgmod.save(cfg, run.config)
                    bar.total = max_steps  # the same bar, its total changed in place
                    bar.refresh()
                    say(f"planned {max_steps} steps to fit {t.max_seconds:.0f} s "
                        f"({budget.per_step * 1000:.0f} ms/step)")

            interval_loss += loss_sum
            interval_steps += 1
            if step % t.log_interval == 0 or step == max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - interval_t0) / interval_steps  # seconds per step
                # Mean training loss over the steps since the last line, not one noisy batch (with
                # several phases: their sum, and each as loss_<phase>).
                losses = [v / (accum * interval_steps) for v in world.mean(interval_loss).tolist()]
                record = {"step": step, unit: state[seen], "loss": sum(losses),
                          "lr": lr, f"{unit}_per_second": round(units_per_step / dt, 1)}
                for (name, _), phase_loss, grad_norm in zip(phases, losses, grad_norms):
                    if name:
                        record[f"loss_{name}"] = phase_loss
                    if grad_norm is not None:  # a DTensor when sharded
                        record["grad_norm" + (f"_{name}" if name else "")] = (
                            grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
                postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{lr:.2e}",
                           f"{unit[:3]}/s": f"{record[f'{unit}_per_second']:,.0f}"}
                if peak:
                    record["mfu"] = round(flops_per_step / dt / peak, 4)
                    postfix["mfu"] = f"{record['mfu']:.1%}"
                log.write(record)
                if not math.isfinite(record["loss"]):  # diverged: no checkpoint of these weights
                    raise UserError(f"the training loss became {record['loss']} at step {step}; lower train.lr (or "
                                    "train.grad_clip) and start again"
                                    + (f", or --resume from the last checkpoint (step {state['step']})"
                                       if run.has_checkpoint() else ""))
                bar.set_postfix(postfix, refresh=False)
                interval_loss, interval_steps = torch.zeros(len(phases), device=device), 0
            if t.eval_interval and step % t.eval_interval == 0 and step != max_steps:
                last_val, last_eval_step = evaluate(), step
                if last_val and bar.disable:  # no bar (stderr is not a terminal): leave a line instead
                    say(f"step {step}/{max_steps or '?'}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in last_val.items() if isinstance(v, float))
                        + f", {state[seen]:,} {unit}, {time.perf_counter() - session_t0:.0f} s")
                if observe(last_val):
                    reason = "early_stop"
                    bar.update(1)
                    break
            if t.checkpoint_interval and step % t.checkpoint_interval == 0:
                checkpoint()
            if step % t.log_interval == 0:
                interval_t0 = time.perf_counter()  # throughput excludes evaluation and checkpoints
            bar.update(1)
    bar.close()

    finished = reason in ("max_steps", "max_seconds", "early_stop")  # not merely paused
    if step > start_step and last_eval_step != step:
        last_val = evaluate()
        if finished:
            observe(last_val)
    best = tracker.step if tracker.keep_best and finished and (run / run.BEST).is_file() else None
    if best is not None and best != step:
        # The last weights go into the trainer state (a --resume continues from them) and the best
        # ones become the run's model, in one checkpoint.
        checkpoint(model_step=best, model_file=run / run.BEST)
        if world.main:
            if not is_sharded(model):  # the final reports (process 0) are on the best weights
                # Laid over the model's own state: a LoRA run's file holds only what the frozen base
                # in memory lacks (a whole model's file replaces every tensor).
                model.load_saved_state({**model.state_dict_for_save(), **load_model_state(run.model)})
    else:
        checkpoint()
        if finished and world.main and (run / run.BEST).is_file():
            (run / run.BEST).unlink()
    log.close()
    extra = {}
    if world.main and reports:
        from lmforge.evaluate.report import plot_loss

        plot_loss(run.path)
        extra = task.finish(run, model, ctx)
    seconds = time.perf_counter() - session_t0
    units_this_session = (step - start_step) * units_per_step
    summary = {
        "run_dir": str(run), "step": step, "steps": step, "max_steps": max_steps, "stopped_by": reason,
        seen: state[seen], "params": params,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "val_loss": last_val.get("val_loss"),
        **{k: v for k, v in last_val.items() if k != "val_loss"},
        "seconds": round(seconds, 2), f"{unit}_per_second": round(units_this_session / max(seconds, 1e-9), 1),
        "device": str(device), "processes": world.size, "rank": world.rank,
    }
    if tracker.metric is not None:
        summary.update(early_stop=tracker.metric, best_step=tracker.step if best is not None else step)
    if private is not None:
        summary.update(private.summary(step))
    if extra:
        summary.update(extra)
        write_json(run / run.SUMMARY, summary)
    return summary
