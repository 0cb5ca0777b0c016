"""The ServerApp: fedsvd's server as a Flower strategy (Message API).

One strategy class serves all five methods (FedSVD, FFA-LoRA, FedAvg-LoRA,
FLoRA, FedEx-LoRA): the method is the run configuration's, and the server
step is the Rust core's (``fedsvd.Server.step``: aggregation by n_k, then
the method's rule; FedSVD refactorizes by SVD). Sampling is the
simulation's, mapped onto nodes by partition id, so a seeded deployment
computes what ``fedsvd run`` computes. The run folder is written in
``fedsvd run``'s format (records re-serialized by the Rust structs), with
the statistics that ``report_unprotected = false`` withholds left out: the
deployment never learns them.
"""

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fedsvd
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

app = ServerApp()


def _arrays(state: dict) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in state.items()})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# How often the ServerApp asks the SuperLink for replies. flwr's own
# `send_and_receive` sleeps 3 s between pulls, which adds 1.5 s on average
# to every round; a pull is one small HTTP request on the SuperLink.
REPLY_POLL_SECONDS = 0.25


class PromptGrid(Grid):
    """A Grid that forwards everything to flwr's, but collects replies every
    ``REPLY_POLL_SECONDS`` instead of every 3 s; same semantics otherwise
    (all replies, or those in by the timeout)."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(REPLY_POLL_SECONDS)
        return replies


class RoundFailed(RuntimeError):
    """A round could not complete (a node did not reply, or replied with an
    error); the run ends with the last checkpoint intact."""


class FedsvdStrategy(Strategy):
    """fedsvd's server as a Flower strategy, for every method."""

    def __init__(
        self,
        server: fedsvd.Server,
        config_text: str,
        nodes: dict[int, int],
        run_dir: Path,
        timeout: float,
        history: list[dict],
    ) -> None:
        self.server = server
        self.config_text = config_text
        self.nodes = nodes
        self.partition_of = dict(nodes)
        self.run_dir = run_dir
        self.timeout = timeout
        self.history = history
        self.offset = server.rounds_done
        self.max_epsilon = next(
            (h["max_epsilon"] for h in reversed(history) if h.get("max_epsilon") is not None), None
        )
        # Each client's ε as its own ledger last reported it (0 before it
        # first trains), as `fedsvd run` writes it; empty without DP.
        private = json.loads(config_text)["federation"]["privacy"]["epsilon"] is not None
        self.client_epsilon = [0.0] * server.num_clients if private else []
        if private and history and len(history[-1].get("client_epsilon") or []) == server.num_clients:
            self.client_epsilon = [float(e) for e in history[-1]["client_epsilon"]]
        self.sent: dict[int, list[int]] = {}
        self.transport_seconds: list[float] = []
        self._sent_at = 0.0

    def summary(self) -> None:
        """Logs the strategy's configuration."""
        print(
            f"fedsvd strategy: method {self.server.method}, {self.server.num_clients} clients, "
            f"{self.server.clients_per_round} per round, {self.server.rounds} rounds "
            f"({self.offset} done), round timeout {self.timeout} s"
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Samples the round's clients as the simulation does and sends each
        node the global state, the round and the run configuration."""
        rnd = server_round + self.offset
        sampled = self.server.sample(rnd)
        node_ids = fedsvd.nodes_for_clients(sampled, list(self.nodes.items()))
        self.sent[rnd] = node_ids
        content = {
            "arrays": _arrays(self.server.state()),
            "config": ConfigRecord(
                {
                    "round": rnd,
                    "init-seed": str(self.server.init_seed),
                    "run-config": self.config_text,
                    # What the label indices mean, for nodes that train on a
                    # file of their own (node config `data-file`).
                    "label-names": json.dumps(self.server.label_names),
                }
            ),
        }
        self._sent_at = time.monotonic()
        return [
            Message(RecordDict(dict(content)), dst_node_id=node, message_type="train")
            for node in node_ids
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server step of the round, its evaluation, its metrics line and
        its checkpoint. A node that did not reply in time, or replied with
        an error, ends the run, naming the node."""
        rnd = server_round + self.offset
        replies = list(replies)
        waited = time.monotonic() - self._sent_at
        by_node = {msg.metadata.src_node_id: msg for msg in replies}
        for node in self.sent[rnd]:
            partition = self.partition_of[node]
            msg = by_node.get(node)
            if msg is None:
                raise RoundFailed(
                    f"round {rnd}: node {node} (partition {partition}) did not reply within "
                    f"{self.timeout} s; the run stops here, its last checkpoint (after round "
                    f"{rnd - 1}) is intact: continue with `fedsvd deploy local --resume "
                    f"{self.run_dir}`"
                )
            if msg.has_error():
                raise RoundFailed(
                    f"round {rnd}: node {node} (partition {partition}) failed: "
                    f"{msg.error.reason}"
                )
        updates = []
        trained, exhausted = [], []
        for node in self.sent[rnd]:
            msg = by_node[node]
            metrics = msg.content["metrics"]
            k = int(metrics["partition-id"])
            if "epsilon-spent" in metrics:
                eps = float(metrics["epsilon-spent"])
                self.max_epsilon = eps if self.max_epsilon is None else max(self.max_epsilon, eps)
                if self.client_epsilon:
                    self.client_epsilon[k] = eps
            if int(metrics["refused"]):
                exhausted.append(k)
                continue
            trained.append(k)
            update = {name: array.numpy() for name, array in msg.content["arrays"].items()}
            updates.append((k, update, int(metrics["num-examples"])))
        self.transport_seconds.append(waited)
        step = self.server.step(rnd, updates)
        evaluation = self.server.evaluate() if self.server.evaluates_after(rnd) else None
        line = {
            "round": rnd,
            "method": self.server.method,
            "sampled_clients": sorted(trained + exhausted),
            "trained_clients": sorted(trained),
            "budget_exhausted_clients": sorted(exhausted),
            "train_loss": None,
            "eval_accuracy": evaluation["accuracy"] if evaluation else None,
            "eval_loss": evaluation["loss"] if evaluation else None,
            "max_epsilon": self.max_epsilon,
            "client_epsilon": list(self.client_epsilon),
            "bytes_uploaded": len(updates) * self.server.upload_bytes,
            "refactorized": step["refactorized"],
            "server_seconds": step["seconds"],
        }
        text = fedsvd.canonical_json("round", json.dumps(line))
        # As `fedsvd run`: the metrics line first, then the checkpoint.
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.server.save_checkpoint(self.run_dir / "checkpoint.json")
        self.history.append(json.loads(text))
        print(
            f"round {rnd}: sampled {line['sampled_clients']}, trained {line['trained_clients']}"
            + (f", accuracy {evaluation['accuracy']:.4f}" if evaluation else "")
            + f", waited {waited:.2f} s for replies",
            flush=True,
        )
        metrics = {"round": rnd, "clients": len(trained)}
        if evaluation:
            metrics.update(accuracy=evaluation["accuracy"], loss=evaluation["loss"])
        return _arrays(self.server.state()), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation: the held-out split is the server's."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (no client-side evaluation)."""
        return None


def _node_partitions(grid: Grid, clients: int, timeout: float) -> dict[int, int]:
    """Waits for `clients` nodes and asks each which partition it serves."""
    deadline = time.monotonic() + timeout
    while True:
        node_ids = list(grid.get_node_ids())
        if len(node_ids) >= clients:
            break
        if time.monotonic() > deadline:
            raise RoundFailed(
                f"only {len(node_ids)} of {clients} nodes connected within {timeout} s"
            )
        time.sleep(1.0)
    queries = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="query")
        for node in node_ids
    ]
    replies = list(grid.send_and_receive(queries, timeout=timeout))
    nodes = {}
    for msg in replies:
        if msg.has_error():
            raise RoundFailed(f"node {msg.metadata.src_node_id} failed: {msg.error.reason}")
        nodes[msg.metadata.src_node_id] = int(msg.content["metrics"]["partition-id"])
    missing = sorted(set(range(clients)) - set(nodes.values()))
    if missing:
        raise RoundFailed(f"no connected node serves partition(s) {missing}")
    return nodes


def _summary(server: fedsvd.Server, config: dict, history: list[dict]) -> str:
    fed = config["federation"]
    last = history[-1]
    rounds = max(len(history), 1)
    end = fedsvd.endpoint(
        [(h["round"], h["eval_accuracy"]) for h in history if h["eval_accuracy"] is not None]
    )
    summary = {
        "method": server.method,
        "dataset": config["data"]["dataset"],
        "epsilon": fed["privacy"]["epsilon"],
        "delta": fed["privacy"]["delta"],
        "seed": fed["seed"],
        "release_ready": fed["seed"] is None and fed["privacy"]["epsilon"] is not None,
        "unprotected_reported": False,
        "budget_rule": fed["privacy"]["budget_rule"],
        "rounds": fed["rounds"],
        "completed_rounds": len(history),
        "final_accuracy": last["eval_accuracy"] if last["eval_accuracy"] is not None else math.nan,
        "final_loss": last["eval_loss"] if last["eval_loss"] is not None else math.nan,
        "endpoint_accuracy": end[0] if end is not None else None,
        "endpoint_rounds": end[1] if end is not None else [],
        "majority_accuracy": server.majority_accuracy,
        "max_epsilon_spent": last["max_epsilon"],
        "noise_multipliers": [],
        "rounds_with_exhausted_clients": sum(1 for h in history if h["budget_exhausted_clients"]),
        "mean_bytes_uploaded_per_round": sum(h["bytes_uploaded"] for h in history) / rounds,
        "mean_server_seconds": sum(h["server_seconds"] for h in history) / rounds,
        "wall_seconds": None,
    }
    return fedsvd.canonical_json("summary", json.dumps(summary))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs the federation described by the run config's `config-file`,
    writing the run folder `out-dir`."""
    grid = PromptGrid(grid)
    rc = context.run_config
    run_dir = Path(str(rc["out-dir"]))
    resume = bool(rc.get("resume", False))
    timeout = float(rc.get("round-timeout", 600.0))
    if resume:
        config_text = (run_dir / "config.json").read_text()
    else:
        config_text = Path(str(rc["config-file"])).read_text()
    config = json.loads(config_text)
    # A deployment never learns what DP does not cover.
    config["federation"]["privacy"]["report_unprotected"] = False
    config_text = fedsvd.canonical_json("config", json.dumps(config))
    model = fedsvd.BaseModel.load(config["model"]["dir"]) if config["model"]["dir"] else None
    history: list[dict] = []
    if resume:
        checkpoint = run_dir / "checkpoint.json"
        init_seed = None
        if checkpoint.is_file():
            init_seed = int(json.loads(checkpoint.read_text())["checkpoint"]["init_seed"])
        server = fedsvd.Server(config_text, model=model, init_seed=init_seed)
        if checkpoint.is_file():
            server.load_checkpoint(checkpoint)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        history = [json.loads(l) for l in lines[: server.rounds_done]]
        if len(history) < server.rounds_done:
            raise RoundFailed(
                f"{run_dir / 'metrics.jsonl'} has {len(history)} round lines, but the checkpoint "
                f"is after round {server.rounds_done}"
            )
        _write_atomic(
            run_dir / "metrics.jsonl",
            "".join(fedsvd.canonical_json("round", json.dumps(h)) + "\n" for h in history),
        )
    else:
        server = fedsvd.Server(config_text, model=model)
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "config.json").exists():
            raise RoundFailed(f"{run_dir} already holds a run (config.json exists)")
        _write_atomic(run_dir / "config.json", config_text + "\n")
        data = {
            "label_names": server.label_names,
            "test_examples": server.test_examples,
            "majority_accuracy": server.majority_accuracy,
        }
        _write_atomic(run_dir / "data.json", json.dumps(data, indent=2) + "\n")
        (run_dir / "metrics.jsonl").write_text("")
    nodes = _node_partitions(grid, server.num_clients, float(rc.get("connect-timeout", 300.0)))
    strategy = FedsvdStrategy(server, config_text, nodes, run_dir, timeout, history)
    started = time.monotonic()
    remaining = server.rounds - server.rounds_done
    if remaining > 0:
        strategy.start(grid, _arrays(server.state()), num_rounds=remaining, timeout=timeout)
    wall = time.monotonic() - started
    _write_atomic(run_dir / "summary.json", _summary(server, config, history) + "\n")
    server.export(run_dir / "model")
    transport = sum(strategy.transport_seconds)
    timing = {
        "rounds": remaining,
        "wall_seconds": wall,
        "seconds_waiting_for_clients": transport,
        "server_seconds": wall - transport,
    }
    _write_atomic(run_dir / "deploy-timing.json", json.dumps(timing, indent=2) + "\n")
    print(f"fedsvd on Flower: {server.rounds} rounds done, run folder {run_dir}", flush=True)
