"""The ClientApp: one fedsvd client per SuperNode.

Each SuperNode serves one client of the federation: ``--node-config
'partition-id=K'`` (its partition of the configured data set, the
simulation's client K, whose noise stream it therefore reproduces in a
seeded run). The client calibrates its own noise multiplier from its own
data, keeps its privacy ledger in a file of its own (``ledger-dir`` in the
node config, default ``./fedsvd-ledgers``), refuses to train past its
budget whatever the server asks, and reports the epsilon it has spent. It
sends only what its method shares and, whatever the run's
``report_unprotected``, none of the statistics DP does not cover (no loss,
no timings, no counts besides n_k, the aggregation weight).
"""

import hashlib
import json
import os
from pathlib import Path

import fedsvd
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

# Loaded once per process: the frozen model and the clients built on it.
_MODELS: dict[str, fedsvd.BaseModel] = {}
_CLIENTS: dict[tuple[str, int], fedsvd.Client] = {}


def _partition_id(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if not isinstance(value, int):
        raise ValueError(
            "this SuperNode has no integer partition-id in its --node-config "
            "(start it with --node-config 'partition-id=K')"
        )
    return value


def _assets(context: Context) -> str | None:
    value = context.node_config.get("assets")
    return str(value) if value else None


def _ledger_path(context: Context, fingerprint: str, partition: int) -> Path:
    folder = Path(str(context.node_config.get("ledger-dir", "fedsvd-ledgers")))
    return folder / f"ledger-{fingerprint}-client-{partition}.json"


def _client(context: Context, config_text: str, init_seed: int) -> tuple[fedsvd.Client, Path]:
    """The node's client for this run, built once per process; its ledger is
    restored from (and kept in) the node's ledger file."""
    partition = _partition_id(context)
    fingerprint = hashlib.sha256(f"{init_seed}\n{config_text}".encode()).hexdigest()[:16]
    ledger = _ledger_path(context, fingerprint, partition)
    key = (fingerprint, partition)
    if key not in _CLIENTS:
        config = json.loads(config_text)
        assets = _assets(context)
        model_dir = config["model"]["dir"] or os.path.join(
            assets or fedsvd.default_assets_dir(), "models", "all-MiniLM-L6-v2"
        )
        if model_dir not in _MODELS:
            _MODELS[model_dir] = fedsvd.BaseModel.load(model_dir)
        client = fedsvd.Client(
            config_text, partition, model=_MODELS[model_dir], assets=assets, init_seed=init_seed
        )
        if ledger.is_file():
            client.restore_ledger(ledger.read_text())
        _CLIENTS[key] = client
    return _CLIENTS[key], ledger


def _save_ledger(client: fedsvd.Client, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(client.ledger_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tells the server which client (partition id) this node serves."""
    metrics = MetricRecord({"partition-id": _partition_id(context)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round: DP-SGD from the server's global state, unless the
    ledger says the round would exceed the budget."""
    config = msg.content["config"]
    config_text = str(config["run-config"])
    init_seed = int(str(config["init-seed"]))
    rnd = int(config["round"])
    client, ledger = _client(context, config_text, init_seed)
    state = {name: array.numpy() for name, array in msg.content["arrays"].items()}
    try:
        update, report = client.train_round(state, rnd)
    except fedsvd.BudgetExhaustedError as refusal:
        metrics = {"partition-id": client.partition_id, "refused": 1}
        if client.epsilon_spent is not None:
            metrics["epsilon-spent"] = client.epsilon_spent
        content = RecordDict(
            {"metrics": MetricRecord(metrics), "refusal": ConfigRecord({"reason": str(refusal)})}
        )
        return Message(content, reply_to=msg)
    _save_ledger(client, ledger)
    metrics = {
        "partition-id": client.partition_id,
        "refused": 0,
        "num-examples": report["examples"],
    }
    if report["epsilon_spent"] is not None:
        metrics["epsilon-spent"] = report["epsilon_spent"]
    arrays = ArrayRecord({name: Array(value) for name, value in update.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)
