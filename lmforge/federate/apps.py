"""lmforge's Flower apps: the ClientApp trains a round on its own data with the normal trainer, the
ServerApp runs the strategy, evaluates the global model after every round and writes the final run.

Flower does the orchestration — sampling nodes, sending the global weights, collecting replies,
weighted averaging — in its simulation runtime (one machine, clients as Ray actors) or its
deployment runtime (a SuperLink and SuperNodes over gRPC); the same two apps serve both.

What travels (shapes): the server's message holds ``arrays`` (the global weights, the run
directory's tensor names) and ``config`` (``lmforge-config``: the resolved run config as JSON;
``local-epochs``; ``rounds``; ``client-data``: JSON list of data directories by partition id, for
the simulation; FedProx adds ``proximal-mu``). A node finds its data by ``partition-id`` (the
simulation sets it) or ``data-path`` in its node config (``flower-supernode --node-config``). The
reply holds ``arrays`` and ``metrics`` (``num-examples``, the weight of its update; ``train_loss``;
with ``train.dp``, ``dp_epsilon`` spent so far by that client over every round).

Client-side DP of the updates (``--client-dp-epsilon``): the server's config adds ``client-dp``
(JSON: ``clip``, ``noise_multiplier``, ``seed``); :func:`client_dp_mod`, a Flower client mod,
clips the client's whole update (its weights minus the round's global weights) to ``clip`` in L2
norm and adds Gaussian noise of standard deviation ``noise_multiplier * clip`` to every weight
before the reply leaves the client, and reports the update's norm before clipping
(``update_norm``). The privacy unit is then the client's whole data, each round a Gaussian
mechanism on it; Opacus's RDP accountant composes the rounds (sampling rate 1: every client
takes part in every round).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from lmforge import config as cfgmod
from lmforge.errors import UserError
from lmforge.progress import status

# Fault injection for the tolerance test and for drills: "CLIENT:ROUND" makes that client's
# training fail in that round, as a site that goes down mid-round would.
FAIL_ENV = "LMFORGE_FEDERATE_FAIL"


def privatize_update(start: dict[str, torch.Tensor], new: dict[str, torch.Tensor], clip: float,
                     noise_multiplier: float, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """``new`` weights whose update from ``start`` is clipped to L2 norm ``clip`` (over all
    floating-point tensors together) and noised, N(0, (noise_multiplier * clip)^2) per weight;
    integer tensors (counters) pass as they are. Returns (the weights, the update's norm before
    clipping)."""
    floats = [k for k, v in new.items() if v.is_floating_point()]
    delta = {k: new[k].double() - start[k].double() for k in floats}
    norm = float(torch.sqrt(sum((d * d).sum() for d in delta.values()))) if floats else 0.0
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    out = dict(new)
    for k in floats:
        noise = torch.randn(delta[k].shape, generator=gen, dtype=torch.float64) * (noise_multiplier * clip)
        out[k] = (start[k].double() + delta[k] * scale + noise).to(new[k].dtype)
    return out, norm


def client_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: with the server's ``client-dp`` config, the reply's update is clipped
    and noised (:func:`privatize_update`) before it leaves the client."""
    config = msg.content["config"]
    if "client-dp" not in config:
        return call_next(msg, context)
    spec = json.loads(str(config["client-dp"]))
    start = msg.content["arrays"].to_torch_state_dict()
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    metrics = reply.content["metrics"]
    gen = torch.Generator().manual_seed(int(spec["seed"]) + 7919 * int(config["server-round"])
                                        + 104729 * int(metrics["client"]))
    weights, norm = privatize_update(start, reply.content["arrays"].to_torch_state_dict(), float(spec["clip"]),
                                     float(spec["noise_multiplier"]), gen)
    reply.content["arrays"] = ArrayRecord({k: weights[k] for k in start})
    metrics["update_norm"] = norm
    return reply


def weights_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict_for_save().items()}


def split_size(data: str, split: str) -> int:
    """Images or tokens in a split of a prepared data directory (0 when it has none)."""
    from lmforge.data.tokens import read_meta

    counts = read_meta(data).get("splits", {}).get(split, {})
    return int(counts.get("images", counts.get("tokens", 0)))


def training_examples(data: str) -> int:
    """A client's training images, tokens, or rows of a labelled file: the weight of its update."""
    if Path(data).is_file():
        from lmforge.data.labeled import read_rows

        return len(read_rows(data)[1])
    return split_size(data, "train")


def local_config(cfg, data: str, epochs: int, rounds: int, seed: int):
    """The config of one client's round: its data, ``epochs`` local epochs (for ``lm``: as many
    steps as cover its windows that often), no validation (the server evaluates), nothing kept but
    the last weights; ``train.dp``'s budget spread over every round."""
    t = cfg.train
    steps, task = None, {"epochs": epochs}
    if hasattr(cfg.task, "val_fraction"):  # a labelled file: every row is the client's to train on
        task["val_fraction"] = 0.0
    if not hasattr(cfg.task, "epochs"):  # next-token training: windows of the context
        window = getattr(cfg.task, "seq_len", None) or cfg.model.block_size
        steps, task = max(1, math.ceil(epochs * ((training_examples(data) - 1) // window) / t.batch_size)), {}
    return cfgmod.replace(cfg, data={"path": data, "val": None, "test": None}, task=task,
                          train={"max_steps": steps, "max_seconds": None, "eval_interval": 0, "early_stop": None,
                                 "keep_best": False, "patience": 0, "checkpoint_interval": 0, "seed": seed,
                                 "tensorboard": False, "dp": dataclasses.replace(t.dp, rounds=rounds)})


def proximal_term(mu: float, anchor: dict[str, torch.Tensor]):
    """FedProx's ``mu / 2 * ||w - w_global||^2`` over the weights the round started from."""
    def penalty(model):
        params = dict(model.named_parameters())
        total = 0.0
        for name, w0 in anchor.items():
            p = params.get(name)
            if p is not None and p.requires_grad and p.is_floating_point():
                total = total + (p - w0.to(p.device, p.dtype)).pow(2).sum()
        return 0.5 * mu * total
    return penalty


def train_round(cfg, data: str, start: dict[str, torch.Tensor], epochs: int, rounds: int, server_round: int,
                client: int, mu: float = 0.0) -> tuple[dict, dict]:
    """One client's round: (its new weights, its metrics)."""
    from lmforge.evaluate.report import read_metrics
    from lmforge.train.privacy import epsilon_spent
    from lmforge.train.trainer import train

    fail = os.environ.get(FAIL_ENV, "")
    if fail and fail == f"{client}:{server_round}":
        raise RuntimeError(f"client {client} failed in round {server_round} ({FAIL_ENV})")
    seed = cfg.train.seed + 7919 * server_round + 104729 * client  # other batches every round and client
    local = local_config(cfg, data, epochs, rounds, seed)
    work = Path(tempfile.mkdtemp(prefix=f"lmforge-client{client}-round{server_round}-"))
    try:
        penalty = proximal_term(mu, start) if mu > 0 else None
        summary = train(local, run_dir=work / "run", start=start, penalty=penalty, reports=False)
        losses = [r["loss"] for r in read_metrics(work / "run") if "loss" in r]
        from lmforge.train.checkpoint import load_model_state

        weights = load_model_state(work / "run" / "model.safetensors")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics = {"num-examples": training_examples(data),
               "train_loss": float(np.mean(losses)) if losses else float("nan"), "steps": int(summary["steps"])}
    if "dp_noise_multiplier" in summary:  # this client's privacy spent over every round so far
        metrics["dp_epsilon"] = epsilon_spent(summary["dp_noise_multiplier"], summary["dp_sample_rate"],
                                              server_round * summary["steps"], summary["dp_delta"])
    return weights, metrics


client_app = ClientApp(mods=[client_dp_mod])


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = cfgmod.from_dict(json.loads(config["lmforge-config"]), "the federation's config")
    node = context.node_config
    if "data-path" in node:
        data, client = str(node["data-path"]), int(node.get("partition-id", 0))
    else:
        client = int(node["partition-id"])
        data = json.loads(config["client-data"])[client]
    start = msg.content["arrays"].to_torch_state_dict()
    weights, metrics = train_round(cfg, data, start, int(config["local-epochs"]), int(config["rounds"]),
                                   int(config["server-round"]), client, float(config.get("proximal-mu", 0.0)))
    metrics["client"] = client
    return Message(RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)}), reply_to=msg)


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Clients' metrics weighted by their examples, but the privacy spent is the worst client's."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in rows)
    out = {weight_key: total, "clients": len(rows)}
    for key in ("train_loss", "steps"):
        out[key] = sum(float(m[key]) * float(m[weight_key]) for m in rows) / total
    if all("update_norm" in m for m in rows):
        out["update_norm"] = float(np.median([float(m["update_norm"]) for m in rows]))
    if all("dp_epsilon" in m for m in rows):
        out["dp_epsilon"] = max(float(m["dp_epsilon"]) for m in rows)
    return MetricRecord(out)


def strategy_for(name: str, mu: float, min_clients: int):
    """Flower's FedAvg or FedProx, recording each round's failed replies in ``failures``."""
    from flwr.serverapp.strategy import FedAvg, FedProx

    base = {"fedavg": FedAvg, "fedprox": FedProx}[name]

    class Recording(base):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            self.failures[server_round] = [m.error.reason.strip().splitlines()[-1][:300] for m in replies
                                           if m.has_error()]
            arrays, metrics = super().aggregate_train(server_round, replies)
            self.metrics[server_round] = dict(metrics) if metrics is not None else None
            return arrays, metrics

    kwargs = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_clients,
                  min_available_nodes=min_clients, train_metrics_aggr_fn=aggregate_metrics)
    strategy = Recording(proximal_mu=mu, **kwargs) if name == "fedprox" else Recording(**kwargs)
    strategy.failures, strategy.metrics = {}, {}  # round -> failed replies' reasons; aggregated metrics
    return strategy


def run_server(plan: dict, grid: Grid) -> dict:
    """The federation's server side: FedAvg/FedProx over ``plan['rounds']`` rounds, the global
    model evaluated on the held-out split after each, and the final run written to
    ``plan['out']``. Returns the federation's summary."""
    from lmforge.federate.run import ServerSide

    server = ServerSide(plan)
    strategy = strategy_for(plan["strategy"], plan["mu"], plan["min_clients"])
    config = ConfigRecord({"lmforge-config": json.dumps(plan["config"]), "local-epochs": plan["local_epochs"],
                           "rounds": plan["rounds"], "client-data": json.dumps(plan["clients"])})
    if plan.get("client_dp"):
        config["client-dp"] = json.dumps(plan["client_dp"])
    t0 = time.perf_counter()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(server.after_round(server_round, arrays.to_torch_state_dict(),
                                               strategy.metrics.get(server_round),
                                               strategy.failures.get(server_round, []),
                                               time.perf_counter() - t0))

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(server.initial_weights()),
                            num_rounds=plan["rounds"], timeout=plan["timeout"], train_config=config,
                            evaluate_fn=evaluate)
    return server.finish(result.arrays.to_torch_state_dict())


def server_app(plan: dict | None = None, done: dict | None = None) -> ServerApp:
    """A ServerApp over ``plan`` (simulation), or over the plan its run config names
    (``plan-file``, deployment). ``done`` receives the summary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        p = plan
        if p is None:
            p = json.loads(Path(str(context.run_config["plan-file"])).read_text(encoding="utf-8"))
        try:
            summary = run_server(p, grid)
        except UserError as e:  # the simulation swallows exceptions: hand the message back
            if done is not None:
                done["error"] = str(e)
            status(f"federation failed: {e}")
            return
        if done is not None:
            done["summary"] = summary

    return app
