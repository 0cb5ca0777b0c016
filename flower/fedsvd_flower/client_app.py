"""The ClientApp: one fedsvd client per SuperNode.

Each SuperNode serves one client of the federation: ``--node-config
'partition-id=K'`` (its partition of the configured data set, the
simulation's client K, whose noise stream it therefore reproduces in a
seeded run). A node whose data is a file of its own names it instead:
``data-file="/data/notes.csv"`` (CSV with a header, or JSONL, with the
run's columns); every row trains, its labels matched to the server's label
names, and ``partition-id`` then only numbers the client. The client calibrates its own noise multiplier from its own
data, keeps its privacy ledger in a file of its own (``ledger-dir`` in the
node config, default ``./fedsvd-ledgers``), refuses to train past its
budget whatever the server asks, and reports the epsilon it has spent. It
sends only what its method shares and, whatever the run's
``report_unprotected``, none of the statistics DP does not cover (no loss,
no timings, no counts besides n_k, the aggregation weight).

After a crash the server redoes the cut round from its last checkpoint. A
client that had already trained and answered that round (its ledger
charged, the reply kept beside the ledger) resends the same reply for the
same global state instead of training again: the same release twice costs
no more privacy, a fresh one would, so a killed deployment resumes with the
ε it would have had without the kill.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import fedsvd
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

# Flower may start a fresh ClientApp process per message: the time from this
# import to the start of training is what that costs us (model load, data,
# calibration); it is logged on the node, never sent to the server.
_IMPORTED = time.perf_counter()
_SETUP_FROM: list[float] = [_IMPORTED]

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


def _data_file(context: Context) -> str | None:
    value = context.node_config.get("data-file")
    return str(value) if value else None


def _client(
    context: Context, config_text: str, init_seed: int, label_names: list[str] | None
) -> tuple[fedsvd.Client, Path]:
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
            config_text,
            partition,
            model=_MODELS[model_dir],
            assets=assets,
            init_seed=init_seed,
            data_file=_data_file(context),
            label_names=label_names,
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


def _state_digest(state: dict) -> str:
    """A fingerprint of the global state a round starts from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        array = np.ascontiguousarray(state[name], dtype=np.float32)
        digest.update(f"{name}:{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _reply_path(ledger: Path) -> Path:
    return ledger.with_name(ledger.name.replace("ledger-", "reply-", 1)).with_suffix(".npz")


def _save_reply(path: Path, rnd: int, digest: str, update: dict, examples: int) -> None:
    """Keeps this round's reply (after the ledger that charged it is on
    disk), so that a round redone after a crash resends the same release
    rather than training again and paying for it twice."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        **{f"update/{name}": value for name, value in update.items()},
        meta=np.array(json.dumps({"round": rnd, "state": digest, "examples": examples})),
    )
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cached_reply(path: Path, rnd: int, digest: str) -> tuple[dict, int] | None:
    """The kept reply to round `rnd` from exactly this global state, if any."""
    if not path.is_file():
        return None
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
        if meta["round"] != rnd or meta["state"] != digest:
            return None
        update = {k.removeprefix("update/"): saved[k] for k in saved.files if k.startswith("update/")}
    return update, int(meta["examples"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tells the server which client (partition id) this node serves."""
    metrics = MetricRecord({"partition-id": _partition_id(context)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round: DP-SGD from the server's global state, unless the
    ledger says the round would exceed the budget."""
    # Setup runs from the import for a process's first message, else from here.
    setup_from = _SETUP_FROM.pop() if _SETUP_FROM else time.perf_counter()
    config = msg.content["config"]
    config_text = str(config["run-config"])
    init_seed = int(str(config["init-seed"]))
    rnd = int(config["round"])
    label_names = json.loads(str(config["label-names"])) if "label-names" in config else None
    client, ledger = _client(context, config_text, init_seed, label_names)
    state = {name: array.numpy() for name, array in msg.content["arrays"].items()}
    digest = _state_digest(state)
    reply = _reply_path(ledger)
    cached = _cached_reply(reply, rnd, digest)
    if cached is not None:
        # This round was trained, charged and answered before the run
        # stopped: the same update again is no new release.
        update, examples = cached
        print(f"fedsvd-client: round {rnd} resent from {reply}", flush=True)
        return _train_reply(msg, client, update, examples, client.epsilon_spent)
    started = time.perf_counter()
    try:
        update, report = client.train_round(state, rnd)
        print(
            f"fedsvd-client timing: round {rnd} partition {client.partition_id} "
            f"setup {started - setup_from:.3f} s training {time.perf_counter() - started:.3f} s",
            flush=True,
        )
    except fedsvd.BudgetExhaustedError as refusal:
        metrics = {"partition-id": client.partition_id, "refused": 1}
        if client.epsilon_spent is not None:
            metrics["epsilon-spent"] = client.epsilon_spent
        content = RecordDict(
            {"metrics": MetricRecord(metrics), "refusal": ConfigRecord({"reason": str(refusal)})}
        )
        return Message(content, reply_to=msg)
    _save_ledger(client, ledger)
    _save_reply(reply, rnd, digest, update, report["examples"])
    return _train_reply(msg, client, update, report["examples"], report["epsilon_spent"])


def _train_reply(
    msg: Message, client: fedsvd.Client, update: dict, examples: int, epsilon: float | None
) -> Message:
    metrics = {
        "partition-id": client.partition_id,
        "refused": 0,
        "num-examples": examples,
    }
    if epsilon is not None:
        metrics["epsilon-spent"] = epsilon
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in update.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)
