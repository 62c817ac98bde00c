"""lmforge federate: train one model across clients that keep their data, on Flower."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import print_json
from lmforge.cli.options import flag

HELP = "federated training on Flower: clients train on their own part of the data, the server averages"


@dataclass
class Options:
    data: list[str] = flag(required=True, nargs="+", help="a `prepare --kind images` directory (--task lm: a "
                           "`prepare` token directory; --task classify: a labelled .csv/.jsonl file) to partition, "
                           "or one per client with --partition by-file")
    out: str = flag(required=True, help="the run directory of the global model (new or empty)")
    task: str = flag("image-classify", choices=["image-classify", "lm", "classify"], help="the task every client "
                     "trains")
    init: str | None = flag(metavar="RUN_OR_HF_DIR", help="--task classify: the model every client fine-tunes "
                            "(default: the bundled all-MiniLM-L6-v2); --task lm: a decoder to continue training")
    clients: int | None = flag(help="number of clients the data is split into (by-file: one per --data)")
    rounds: int = flag(3, help="federated rounds: the server sends the global model, every client trains on it, "
                       "the server averages their weights (by examples)")
    local_epochs: int = flag(1, help="epochs each client trains on its own data per round")
    partition: str = flag("iid", metavar="iid|dirichlet:ALPHA|by-file", help="how the examples are dealt out: iid "
                          "(shuffled, equal parts; --task lm: the text's windows), dirichlet:ALPHA (label skew, "
                          "smaller ALPHA: fewer classes per client) or by-file (each --data directory is one "
                          "client's)")
    strategy: str = flag("fedavg", choices=["fedavg", "fedprox"], help="Flower's FedAvg, or FedProx (a proximal "
                         "term mu/2 ||w - w_global||^2 in every client's loss)")
    mu: float = flag(0.01, help="FedProx's proximal weight")
    min_clients: int | None = flag(help="clients that must be connected for a round to start (default: all); a "
                                   "client that fails mid-round is left out of that round's average")
    model: str | None = flag(help="model family (cnn, mlp; --task lm: gpt, llama, lstm; default: the preset's)")
    preset: str | None = flag(help="keras-mnist, keras-cifar, cnn-small, resnet-small, mlp; --task lm: debug, nano, "
                              "llama-debug, lstm-debug, ...")
    config: str | None = flag(help="YAML file with task:, model: and train: sections (each client's training)")
    set: list[str] | None = flag(append=True, metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4 or "
                                 "train.dp.epsilon=8 (DP-SGD on every client, the budget over all rounds)")
    superlink: str | None = flag(metavar="HOST:PORT", help="run on Flower's deployment runtime: the Control API of a "
                                 "running flower-superlink (e.g. 127.0.0.1:9093) whose SuperNodes hold the data "
                                 "(each started with --node-config \"data-path='DIR'\"); --data is then the "
                                 "server's held-out evaluation data and --clients the SuperNodes to wait for")
    client_dp_epsilon: float | None = flag(help="client-side DP of the updates: each round every client clips its "
                                           "whole update to --client-dp-clip and adds Gaussian noise before it "
                                           "leaves; the noise is set so that all rounds spend this epsilon "
                                           "(the privacy unit: a client's whole data)")
    client_dp_delta: float = flag(1e-5, help="--client-dp-epsilon's delta")
    client_dp_clip: float = flag(1.0, help="L2 norm each client's update is clipped to (the log shows the updates' "
                                 "median norm before clipping)")
    seed: int = flag(1337, help="seed of the partition, the initial model and every client's batches")
    json: bool = flag(False)


def run(o: Options) -> int:
    """Partition the data into --clients, run --rounds of federated training on Flower's simulation
    runtime (clients as Ray actors on this machine) or, with --superlink, on SuperNodes that hold
    their own data (Flower's deployment runtime), evaluate the global model on the held-out
    split after every round, and leave an ordinary run directory (eval, predict, serve, explain,
    compress and export use it as any other) with ``federated.json``."""
    from lmforge.federate.run import FederateRequest, federate

    req = FederateRequest(data=o.data, out=o.out, clients=o.clients, rounds=o.rounds, partition=o.partition,
                          strategy=o.strategy, mu=o.mu, local_epochs=o.local_epochs, min_clients=o.min_clients,
                          task=o.task, model=o.model, preset=o.preset, config=o.config,
                          set=(o.set or []) + ([f"task.init={o.init}"] if o.init else []), seed=o.seed,
                          superlink=o.superlink, client_dp_epsilon=o.client_dp_epsilon,
                          client_dp_delta=o.client_dp_delta, client_dp_clip=o.client_dp_clip)
    s = federate(req)
    if o.json:
        print_json(s)
        return 0
    print(f"federated {s['run_dir']}: {s['arch']} over {s['clients']} clients ({s['partition']}), {s['rounds']} "
          f"rounds of {s['strategy']}; global validation "
          + (f"accuracy {s['val_accuracy']:.4f} (best {s['best_val_accuracy']:.4f}" if s["val_accuracy"] is not None
             else f"loss {s['val_loss']:.4f} (best {s['best_val_loss']:.4f}") + f" at round {s['best_round']})"
          + (f", test accuracy {s['test']['accuracy']:.4f}" if s.get("test") else "")
          + (f"; dp epsilon {s['dp_epsilon']:.2f} (delta {s['dp_delta']})" if s.get("dp_epsilon") is not None else "")
          + (f"; client-level dp epsilon {s['client_dp']['epsilon']:.2f} (delta {s['client_dp']['delta']})"
             if s.get("client_dp") else ""))
    for r, reasons in s["failed_rounds"].items():
        print(f"round {r}: {len(reasons)} client(s) failed and were left out of the average: {reasons[0]}")
    return 0
