"""``lmforge federate``: plan a federation (data partitions, the global config), run it on Flower's
simulation runtime, and leave an ordinary run directory behind.

The run directory is what ``train`` would leave for the same task: ``config.yaml`` (the clients'
local training; ``data.path`` the data the global model is evaluated on), ``model.safetensors``
(the global model after the last round), ``metrics.jsonl`` (one training line — the clients'
mean loss — and one evaluation line per round, ``step`` = round), the task's report and plots,
plus ``federated.json``: the partition (sizes and classes per client), the strategy, each round's
figures and failures, and with ``train.dp`` the privacy spent by the worst client.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import torch

from lmforge import config as cfgmod
from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, write_json
from lmforge.progress import status
from lmforge.runs import RunDir

TASKS_FEDERATED = ("image-classify", "lm", "classify")
STRATEGIES = ("fedavg", "fedprox")
FEDERATED = "federated.json"


def _global_task(cfg, data_path: str):
    """The task over the held-out data, resolved as a single process would (its model config is
    the federation's)."""
    from lmforge.tasks import TASKS
    from lmforge.train.distributed import world_from_env

    cfg = cfgmod.replace(cfg, data={"path": data_path})
    # The length of the clients' local training is each client's own (apps.local_config); a token
    # task wants one to be built, and this one is only evaluated.
    steps = cfg.train.max_steps
    task = TASKS[cfg.task.name](cfgmod.replace(cfg, train={"max_steps": steps or 1}), None)
    cfg = cfgmod.replace(task.resolve(cfg, world_from_env()), train={"max_steps": steps})
    cfgmod.validate(cfg)
    task.cfg = cfg
    return task, cfg


class ServerSide:
    """The server's share of a federation: the global model, its evaluation after every round on
    the held-out split, the round log, and the final run directory."""

    def __init__(self, plan: dict):
        from lmforge.device import autocast_for, resolve_device
        from lmforge.train.metrics_log import MetricsLog

        self.plan = plan
        cfg = cfgmod.from_dict(plan["config"], "the federation's config")
        self.task, self.cfg = _global_task(cfg, plan["eval_data"])
        self.device = resolve_device(self.cfg.train.device)
        torch.manual_seed(self.cfg.train.seed)
        self.model = self.task.build_model(self.cfg).to(self.device)
        self.task.to(self.device)
        self.ctx = autocast_for(self.device, self.cfg.train.dtype)
        self.run = RunDir(plan["out"])
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(self.run.path, False)
        self.rounds: list[dict] = []
        self.examples = 0

    def initial_weights(self) -> dict[str, torch.Tensor]:
        from lmforge.federate.apps import weights_of

        return weights_of(self.model)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        from lmforge.train.checkpoint import load_into

        load_into(self.model, {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()},
                  "the aggregated weights")

    def after_round(self, server_round: int, weights: dict, metrics: dict | None, failures: list[str],
                    seconds: float) -> dict:
        """Evaluate the global model after ``server_round`` (0: before any), log the round; returns
        its figures (floats)."""
        self.load(weights)
        val = self.task.evaluate(self.model, self.ctx)
        row = {"round": server_round, "seconds": round(seconds, 2)}
        if server_round:
            ok = int(metrics["clients"]) if metrics else 0
            self.examples += int(metrics["num-examples"]) * self.plan["local_epochs"] if metrics else 0
            row.update(clients=ok, clients_failed=len(failures), failures=failures)
            if metrics:
                row["loss"] = float(metrics["train_loss"])
                if "dp_epsilon" in metrics:
                    row["dp_epsilon"] = float(metrics["dp_epsilon"])
                if "update_norm" in metrics:  # the median client's, before clipping
                    row["update_norm"] = float(metrics["update_norm"])
                self.log.write({"step": server_round, "examples": self.examples, "loss": row["loss"]})
            dp = self.plan.get("client_dp")
            if dp:
                from lmforge.train.privacy import epsilon_spent

                row["client_dp_epsilon"] = epsilon_spent(dp["noise_multiplier"], 1.0, server_round, dp["delta"])
        row.update({k: v for k, v in val.items() if isinstance(v, (int, float))})
        self.log.write({"step": server_round, "examples": self.examples,
                        **{k: v for k, v in row.items()
                           if k.startswith(("val_", "train_", "dp_", "client_dp_")) or k == "update_norm"}})
        self.rounds.append(row)
        acc = row.get("val_accuracy")
        note = (f"; {len(failures)} client(s) failed, {row.get('clients', 0)} aggregated: {failures[0]}"
                if failures else "")
        status(f"round {server_round}/{self.plan['rounds']}: global validation "
               + (f"accuracy {acc:.4f}, " if acc is not None else "") + f"loss {row.get('val_loss', float('nan')):.4f}"
               + (f", dp epsilon {row['dp_epsilon']:.2f}" if "dp_epsilon" in row else "")
               + (f", client-level epsilon {row['client_dp_epsilon']:.2f} (update norm "
                  f"{row.get('update_norm', float('nan')):.3g}, "
                  f"clipped to {self.plan['client_dp']['clip']:g})" if "client_dp_epsilon" in row else "") + note)
        return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def finish(self, weights: dict) -> dict:
        """Write the final run directory from the last round's weights; returns the summary."""
        from lmforge.evaluate.report import plot_loss
        from lmforge.train.checkpoint import save_model

        done = [r for r in self.rounds if r["round"]]
        if not done or all(r.get("clients", 0) == 0 for r in done):
            raise UserError("no round of the federation had a client reply; see the errors above")
        self.load(weights)
        self.log.close()
        cfg = cfgmod.replace(self.cfg, data={"path": self.plan["data_final"]})
        cfgmod.save(cfg, self.run.config)
        self.task.write_files(self.run, self.model)
        save_model(self.model, self.run.model, metadata={"format": "lmforge", "rounds": str(len(done))})
        extra = self.task.finish(self.run, self.model, self.ctx)
        plot_loss(self.run.path)
        failed = {r["round"]: r["failures"] for r in done if r.get("failures")}
        best = (max(done, key=lambda r: r.get("val_accuracy", float("-inf"))) if "val_accuracy" in done[-1]
                else min(done, key=lambda r: r.get("val_loss", float("inf"))))
        summary = {
            "run_dir": self.plan["final_out"], "task": cfg.task.name, "arch": cfg.arch,
            "clients": len(self.plan["clients"]) or self.plan["min_clients"], "rounds": len(done), "partition": self.plan["partition"],
            "strategy": self.plan["strategy"], "proximal_mu": self.plan["mu"] if self.plan["strategy"] == "fedprox"
            else None, "local_epochs": self.plan["local_epochs"], "min_clients": self.plan["min_clients"],
            "client_examples": self.plan["sizes"], "client_unit": self.task.unit,
            "client_classes": self.plan["class_counts"],
            "val_accuracy": done[-1].get("val_accuracy"), "val_loss": done[-1].get("val_loss"),
            "best_round": best["round"], "best_val_accuracy": best.get("val_accuracy"),
            "best_val_loss": best.get("val_loss"),
            "failed_rounds": failed, "per_round": self.rounds, "examples_seen": self.examples,
            "params": self.model.num_params(), **{k: v for k, v in extra.items() if k in ("validation", "test")},
        }
        if cfg.train.dp.epsilon is not None:
            summary.update(dp_epsilon=done[-1].get("dp_epsilon"), dp_delta=cfg.train.dp.delta,
                           dp_target_epsilon=cfg.train.dp.epsilon, dp_max_grad_norm=cfg.train.dp.max_grad_norm,
                           dp_scope="per client: DP-SGD on its own examples, the target spread over every round")
        if self.plan.get("client_dp"):
            summary["client_dp"] = {**self.plan["client_dp"], "epsilon": done[-1].get("client_dp_epsilon"),
                                    "scope": "per client: each round's whole update clipped and noised on the "
                                             "client, the rounds composed by Opacus's RDP accountant"}
        write_json(self.run / FEDERATED, summary)
        write_json(self.run / self.run.SUMMARY, summary)
        return summary


@dataclasses.dataclass
class FederateRequest:
    """What ``lmforge federate`` was asked for (the CLI's options, checked)."""

    data: list[str]
    out: str
    clients: int | None = None
    rounds: int = 3
    partition: str = "iid"
    strategy: str = "fedavg"
    mu: float = 0.01
    local_epochs: int = 1
    min_clients: int | None = None
    task: str = "image-classify"
    model: str | None = None
    preset: str | None = None
    config: str | None = None
    set: list[str] | None = None
    seed: int = 1337
    timeout: float = 3600.0
    superlink: str | None = None  # a SuperLink's Control API (deployment runtime); None: the simulation
    # Client-side DP of each round's update (apps.client_dp_mod): the target epsilon over every
    # round, its delta, the L2 norm each update is clipped to.
    client_dp_epsilon: float | None = None
    client_dp_delta: float = 1e-5
    client_dp_clip: float = 1.0


def check(req: FederateRequest, cfg) -> None:
    if req.task not in TASKS_FEDERATED:
        raise UserError(f"lmforge federate trains {', '.join(TASKS_FEDERATED)} runs for now, not --task {req.task}")
    if req.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {req.rounds}")
    if req.local_epochs < 1:
        raise UserError(f"--local-epochs must be at least 1, got {req.local_epochs}")
    if req.strategy not in STRATEGIES:
        raise UserError(f"--strategy takes {' or '.join(STRATEGIES)}, not {req.strategy!r}")
    if req.strategy == "fedprox" and not req.mu > 0:
        raise UserError(f"--mu (FedProx's proximal weight) must be positive, got {req.mu}")
    if req.strategy == "fedprox" and cfg.train.dp.epsilon is not None:
        raise UserError("--strategy fedprox with train.dp: the proximal term would escape DP-SGD's per-example "
                        "clipping; use --strategy fedavg")
    if req.client_dp_epsilon is not None:
        from lmforge.train.privacy import check_budget

        check_budget(req.client_dp_epsilon, req.client_dp_delta, req.client_dp_clip,
                     ("--client-dp-epsilon", "--client-dp-delta", "--client-dp-clip"))
    if cfg.train.dp.epsilon is not None and cfg.train.grad_accum != 1:
        raise UserError("train.dp samples one Poisson batch per step: train.grad_accum must be 1")
    out = Path(req.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; choose another")


def federate(req: FederateRequest) -> dict:
    """Run the federation ``req`` on Flower's simulation runtime, or with ``req.superlink`` on its
    deployment runtime (``deploy.py``); returns its summary."""
    values = {"train": {"seed": req.seed}}
    file_train = (cfgmod.load_yaml(req.config).get("train") or {}) if req.config else {}
    if "schedule" not in file_train:
        # Local training at a constant rate (after the warm-up), as FedAvg is usually run: a
        # schedule that decays within every round slows the federation (bench/RESULTS.md §29).
        values["train"]["schedule"] = "constant"
    cfg = cfgmod.build_config(req.preset, req.config, req.set, task=req.task, values=values, arch=req.model)
    check(req, cfg)
    from lmforge.federate.partition import federation

    out = Path(req.out)
    if req.superlink is not None:
        return _federate_deployed(req, cfg, out)
    window = (getattr(cfg.task, "seq_len", None) or cfg.model.block_size) if req.task == "lm" else 0
    fed = federation(req.data, req.clients, req.partition, cfg.train.seed, req.task, window, cfg.task)
    if req.task == "classify":  # every client's head has the federation's classes, in one order
        cfg = cfgmod.replace(cfg, task={"labels": fed.names})
    n = len(fed.clients)
    min_clients = _min_clients(req, n)
    if not fed.has_validation:
        raise UserError("the federation needs a validation split to evaluate the global model on; prepare the "
                        "data with --val-fraction above 0")
    with atomic_dir(out) as tmp:
        work = tmp / ".clients"
        clients = [str(fed.write_client(i, work / str(i)).resolve()) for i in range(n)]
        if req.partition == "by-file":
            eval_data, data_final = str(fed.write_pooled(tmp / "data")), str((out / "data").resolve())
        else:
            eval_data = data_final = fed.source
        plan = _plan(req, cfg, tmp, out, clients, eval_data, data_final, min_clients, fed.sizes, fed.class_counts())
        status(f"federation: {n} clients ({req.partition}; {'tokens' if req.task == 'lm' else 'examples'} "
               f"{fed.sizes}), {req.rounds} rounds of "
               f"{req.local_epochs} local epoch(s), {req.strategy}" + (f" mu={req.mu}" if req.strategy == "fedprox"
                                                                       else ""))
        summary = simulate(plan, n)
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _file_labels(path: str, options) -> list[str]:
    """The class names of a labelled file (the server's, on the deployment runtime: every
    SuperNode's head is built for them); it must hold a validation share."""
    from lmforge.data.labeled import label_names, read_examples, stratified_split

    if not options.val_fraction > 0:
        raise UserError("the server evaluates the global model on --data's validation share: task.val_fraction > 0")
    ex = read_examples(path, options.text_column, options.label_column)
    if options.labels:
        return list(options.labels)
    return label_names(stratified_split(ex, options.val_fraction, 0)[0].labels)


def _min_clients(req: FederateRequest, n: int) -> int:
    min_clients = n if req.min_clients is None else req.min_clients
    if not 1 <= min_clients <= n:
        raise UserError(f"--min-clients must be between 1 and the {n} clients, got {min_clients}")
    return min_clients


def _plan(req, cfg, tmp: Path, out: Path, clients: list[str], eval_data: str, data_final: str, min_clients: int,
          sizes, class_counts) -> dict:
    """The plan both apps run (checked: a bad config or data is one line before Flower starts)."""
    _, resolved = _global_task(cfg, eval_data)
    if resolved.train.dp.epsilon is not None:
        from lmforge.models import build_model
        from lmforge.train.privacy import check_config, check_model, per_example_ready

        check_config(resolved.train.dp)
        model = build_model(resolved.arch, resolved.model)
        per_example_ready(model)
        check_model(model)
    client_dp = None
    if req.client_dp_epsilon is not None:  # every client in every round: sampling rate 1
        from opacus.accountants.utils import get_noise_multiplier

        z = float(get_noise_multiplier(target_epsilon=req.client_dp_epsilon, target_delta=req.client_dp_delta,
                                       sample_rate=1.0, steps=req.rounds))
        client_dp = {"clip": req.client_dp_clip, "noise_multiplier": z, "delta": req.client_dp_delta,
                     "target_epsilon": req.client_dp_epsilon, "seed": resolved.train.seed}
    return {"config": cfgmod.to_dict(resolved), "out": str(tmp.resolve()), "final_out": str(out), "clients": clients,
            "client_dp": client_dp,
            "eval_data": eval_data, "data_final": data_final, "rounds": req.rounds,
            "local_epochs": req.local_epochs, "strategy": req.strategy, "mu": req.mu,
            "min_clients": min_clients, "partition": req.partition, "sizes": sizes,
            "class_counts": class_counts, "timeout": req.timeout}


def _federate_deployed(req: FederateRequest, cfg, out: Path) -> dict:
    """The deployment runtime: the clients are SuperNodes holding their own data (their
    ``data-path``); ``--data`` is the server's held-out data, evaluated after every round."""
    from lmforge.federate.apps import split_size
    from lmforge.federate.deploy import run_deployed

    if len(req.data) != 1 or req.partition != "iid" or req.clients is None or req.clients < 1:
        raise UserError("--superlink: the SuperNodes hold the data; give --clients N (the SuperNodes to wait for) "
                        "and one --data directory (the server's held-out evaluation data), no --partition")
    if req.task == "classify":
        cfg = cfgmod.replace(cfg, task={"labels": _file_labels(req.data[0], cfg.task)})
    elif not split_size(req.data[0], "val"):
        raise UserError(f"{req.data[0]}: no validation split to evaluate the global model on")
    min_clients = _min_clients(req, req.clients)
    eval_data = str(Path(req.data[0]).resolve())
    with atomic_dir(out) as tmp:
        plan = _plan(req, cfg, tmp, out, [], eval_data, eval_data, min_clients, None, None)
        plan["partition"] = "by-node"
        summary = run_deployed(plan, tmp / ".flower", req.superlink, req.timeout)
        shutil.rmtree(tmp / ".flower", ignore_errors=True)
    return summary


def simulate(plan: dict, clients: int) -> dict:
    """Run ``plan`` on Flower's simulation runtime (clients as Ray actors, one CPU each)."""
    from flwr.simulation import run_simulation

    from lmforge.federate.apps import client_app, server_app

    done: dict = {}
    cpus = max(1, min(clients, os.cpu_count() or 1))
    quiet = [logging.getLogger(name) for name in ("flwr",)]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        run_simulation(server_app(plan, done), client_app, num_supernodes=clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                     "log_to_driver": True}})
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    if "error" in done:
        raise UserError(done["error"])
    if "summary" not in done:
        raise UserError("the federation stopped without a result (see Flower's messages above)")
    return done["summary"]

