"""The Python package against the Rust CLI: accountants, errors, a client's
round, the client ledger, sampling, and a whole federation driven from
Python against `fedsvd run`."""

import json
from pathlib import Path

import numpy as np
import pytest

import fedsvd
from conftest import run_cli


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_the_cli(accountant: str) -> None:
    args = ["--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]
    cli = json.loads(
        run_cli("privacy", "epsilon", "--noise-multiplier", "1.1", *args,
                "--accountant", accountant, "--json")
    )
    ours = fedsvd.epsilon(1.1, 0.01, 1000, 1e-5, accountant=accountant)
    assert ours == cli["epsilon"]
    assert 0.5 < ours < 5.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_multiplier_equals_the_cli(accountant: str) -> None:
    cli = json.loads(
        run_cli("privacy", "noise", "--epsilon", "3", "--sample-rate", "0.1", "--steps", "60",
                "--delta", "1e-5", "--accountant", accountant, "--json")
    )
    sigma = fedsvd.noise_multiplier(3.0, 0.1, 60, 1e-5, accountant=accountant)
    assert sigma == cli["noise_multiplier"]
    # The calibrated sigma spends at most the target.
    assert fedsvd.epsilon(sigma, 0.1, 60, 1e-5, accountant=accountant) <= 3.0


def test_errors_carry_the_rust_messages(tiny) -> None:
    with pytest.raises(fedsvd.FedsvdError, match=r"sample rate q = 1.5 is invalid"):
        fedsvd.epsilon(1.0, 1.5, 10, 1e-5)
    with pytest.raises(fedsvd.FedsvdError, match=r'accountant: "gdp" is not one of'):
        fedsvd.epsilon(1.0, 0.1, 10, 1e-5, accountant="gdp")
    config = tiny()
    config["data"]["clients"] = 0
    with pytest.raises(fedsvd.FedsvdError, match=r"invalid configuration: data.clients = 0"):
        fedsvd.Client(config, 0)
    config = tiny()
    config["federation"]["rounds_typo"] = 3
    with pytest.raises(fedsvd.FedsvdError, match=r"unknown field `rounds_typo`"):
        fedsvd.Server(config)
    with pytest.raises(fedsvd.FedsvdError, match=r"partition_id: 9 is not below data.clients = 4"):
        fedsvd.Client(tiny(), 9)
    with pytest.raises(fedsvd.FedsvdError, match=r"cannot read .*nowhere"):
        fedsvd.BaseModel.load("/nowhere")


def test_a_round_changes_b_only_for_fedsvd_and_a_too_for_fedavg(tiny) -> None:
    for method, trains_a in [("fedsvd", False), ("ffa", False), ("fedavg", True)]:
        config = tiny(method)
        server = fedsvd.Server(config)
        client = fedsvd.Client(config, 1, init_seed=server.init_seed)
        state = server.state()
        assert all(v.dtype == np.float32 for v in state.values())
        update, report = client.train_round(state, 1)
        assert report["examples"] == client.num_examples > 0
        assert report["steps"] == 2
        b_keys = sorted(k for k in update if k.endswith(".b"))
        a_keys = sorted(k for k in update if k.endswith(".a"))
        assert len(b_keys) == 4  # query and value of 2 layers
        assert bool(a_keys) == trains_a, method
        for key in b_keys:
            assert update[key].dtype == np.float32
            assert update[key].shape == state[key].shape
            assert np.abs(update[key] - state[key]).max() > 0, f"{method}: {key} unchanged"
        for key in a_keys:
            assert np.abs(update[key] - state[key]).max() > 0, f"{method}: {key} unchanged"
        assert set(update) - set(b_keys) - set(a_keys) == {"head"}
        # The ledger was charged by the round.
        spent = client.epsilon_spent
        assert report["epsilon_spent"] == spent
        assert 0 < spent <= client.epsilon_budget


def test_bad_arrays_are_refused_with_the_key(tiny) -> None:
    config = tiny()
    server = fedsvd.Server(config)
    client = fedsvd.Client(config, 0, init_seed=server.init_seed)
    state = server.state()
    key = next(k for k in state if k.endswith(".b"))
    wrong = dict(state)
    wrong[key] = state[key].astype(np.float64)
    with pytest.raises(fedsvd.FedsvdError, match=rf'global_state\["{key}"\]: must be a numpy array of dtype float32'):
        client.train_round(wrong, 1)
    wrong[key] = state[key][:, :2].copy()
    with pytest.raises(fedsvd.FedsvdError, match=r"must have shape"):
        client.train_round(wrong, 1)
    del wrong[key]
    with pytest.raises(fedsvd.FedsvdError, match=rf'has no array "{key}"'):
        client.train_round(wrong, 1)
    with pytest.raises(fedsvd.FedsvdError, match=r"rounds count from 1"):
        client.train_round(state, 0)
    # A client not sampled in round 1 cannot get its update in.
    sampled = server.sample(1)
    other = next(k for k in range(4) if k not in sampled)
    outsider = fedsvd.Client(config, other, init_seed=server.init_seed)
    update, report = outsider.train_round(state, 1)
    with pytest.raises(fedsvd.FedsvdError, match=rf"an update from client {other} in round 1"):
        server.step(1, [(other, update, report["examples"])])
    assert server.rounds_done == 0


def test_a_client_at_its_budget_refuses_and_its_ledger_survives_a_restart(tiny) -> None:
    # Calibrated for the expected participation: 6 rounds x 2 steps x 2/4 =
    # 6 steps, so the fourth round would exceed the budget.
    config = tiny("ffa", federation__rounds=6)
    config["federation"]["privacy"]["budget_rule"] = "expected"
    server = fedsvd.Server(config)
    client = fedsvd.Client(config, 2, init_seed=server.init_seed)
    state = server.state()
    for rnd in range(1, 4):
        client.train_round(state, rnd)
    spent = client.epsilon_spent
    assert spent <= client.epsilon_budget == 6.0
    with pytest.raises(fedsvd.BudgetExhaustedError, match=r"client 2 refuses to train round 4"):
        client.train_round(state, 4)
    assert client.epsilon_spent == spent  # nothing charged
    # The ledger moves to a restarted client process, which refuses too.
    saved = client.ledger_json()
    restarted = fedsvd.Client(config, 2, init_seed=server.init_seed)
    assert restarted.epsilon_spent == 0.0
    restarted.restore_ledger(saved)
    assert restarted.epsilon_spent == spent
    with pytest.raises(fedsvd.BudgetExhaustedError):
        restarted.train_round(state, 5)
    # A ledger with another sigma is refused, naming what changed.
    tampered = json.loads(saved)
    tampered["noise_multiplier"] *= 0.5
    with pytest.raises(fedsvd.FedsvdError, match=r"client 2's privacy ledger no longer matches.*noise multiplier"):
        restarted.restore_ledger(json.dumps(tampered))


def test_sampling_maps_nodes_by_partition_id_with_fewer_per_round() -> None:
    sampled = fedsvd.sample_clients(6, 2, 5, 4)
    assert len(sampled) == 2 and sampled == sorted(sampled)
    assert sampled == fedsvd.sample_clients(6, 2, 5, 4)
    nodes = [(9000 + 13 * p, p) for p in [3, 5, 0, 1, 4, 2]]
    assert fedsvd.nodes_for_clients(sampled, nodes) == [9000 + 13 * k for k in sampled]
    with pytest.raises(fedsvd.FedsvdError, match=rf"{sampled[0]} was sampled, but no connected node serves it"):
        fedsvd.nodes_for_clients(sampled, [n for n in nodes if n[1] != sampled[0]])


def matrix(value: dict) -> np.ndarray:
    """An ndarray serialized by serde (`{"v", "dim", "data"}`)."""
    return np.array(value["data"], dtype=np.float32).reshape(value["dim"])


@pytest.mark.parametrize("method", ["fedsvd", "ffa", "fedavg", "flora", "fedex"])
def test_a_federation_driven_from_python_is_fedsvd_run(tiny, tmp_path: Path, method: str) -> None:
    config = tiny(method)
    (tmp_path / "config.json").write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    run_cli("run", "--preset", "quick", "--config", str(tmp_path / "config.json"),
            "--out", str(run_dir), "--quiet")
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]

    model = fedsvd.BaseModel.load(config["model"]["dir"])
    server = fedsvd.Server(config, model=model)
    clients = [fedsvd.Client(config, k, model=model, init_seed=server.init_seed) for k in range(4)]
    epsilons = {}
    for rnd in range(1, server.rounds + 1):
        sampled = server.sample(rnd)
        assert sampled == lines[rnd - 1]["sampled_clients"]
        state = server.state()
        updates = []
        for k in sampled:
            update, report = clients[k].train_round(state, rnd)
            updates.append((k, update, report["examples"]))
            epsilons[k] = report["epsilon_spent"]
        step = server.step(rnd, updates[::-1])
        assert step["refactorized"] == lines[rnd - 1]["refactorized"]
        assert max(epsilons.values()) == lines[rnd - 1]["max_epsilon"]
        assert server.evaluates_after(rnd)
        evaluation = server.evaluate()
        assert evaluation["accuracy"] == pytest.approx(lines[rnd - 1]["eval_accuracy"], abs=1e-6)
        assert evaluation["loss"] == pytest.approx(lines[rnd - 1]["eval_loss"], abs=1e-6)
        assert evaluation["examples"] == server.test_examples
    assert server.test_examples == json.loads((run_dir / "data.json").read_text())["test_examples"]
    assert server.finished
    saved = json.loads((run_dir / "checkpoint.json").read_text())["checkpoint"]["state"]
    final = server.state()
    for module in saved["modules"]:
        for part in ["a", "b"]:
            np.testing.assert_allclose(final[f"{module['name']}.{part}"], matrix(module[part]), atol=1e-6, rtol=0)
        if module["base_delta"] is not None:
            np.testing.assert_allclose(final[f"{module['name']}.base_delta"], matrix(module["base_delta"]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(final["head"], np.array(saved["head"], dtype=np.float32), atol=1e-6, rtol=0)
    # The export is the CLI's, file for file.
    exported = Path(server.export(tmp_path / "model"))
    cli_export = run_dir / "model"
    names = sorted(p.name for p in cli_export.iterdir())
    assert names == sorted(p.name for p in exported.iterdir())
    for name in names:
        assert (exported / name).read_bytes() == (cli_export / name).read_bytes(), name


def test_checkpoints_round_trip_and_refuse_edits(tiny, tmp_path: Path) -> None:
    config = tiny()
    server = fedsvd.Server(config)
    client = fedsvd.Client(config, server.sample(1)[0], init_seed=server.init_seed)
    update, report = client.train_round(server.state(), 1)
    server.step(1, [(client.partition_id, update, report["examples"])])
    path = tmp_path / "checkpoint.json"
    server.save_checkpoint(path)
    again = fedsvd.Server(config)
    again.load_checkpoint(path)
    assert again.rounds_done == 1
    for key, value in server.state().items():
        np.testing.assert_array_equal(again.state()[key], value)
    text = path.read_text()
    path.write_text(text.replace('"next_round": 1', '"next_round": 2'))
    with pytest.raises(fedsvd.FedsvdError, match=r"checksum does not match"):
        again.load_checkpoint(path)


def test_canonical_json_rewrites_records_as_the_cli() -> None:
    config = fedsvd.preset("quick")
    once = fedsvd.canonical_json("config", config)
    assert fedsvd.canonical_json("config", once) == once
    for section in ["data", "adapters", "federation"]:
        assert json.loads(once)[section] == json.loads(config)[section]
    with pytest.raises(fedsvd.FedsvdError, match=r"missing field"):
        fedsvd.canonical_json("round", "{}")


def test_a_peft_adapter_naming_a_hub_id_finds_its_local_base_model(tiny, tmp_path: Path) -> None:
    import shutil

    config = tiny()
    # A local copy of the (tiny) base model where a Hub id points:
    # <assets>/models/<name>.
    assets = tmp_path / "assets"
    local = assets / "models" / "tiny-bert"
    shutil.copytree(config["model"]["dir"], local)
    model = fedsvd.BaseModel.load("some-org/tiny-bert", assets=assets)
    assert Path(model.path) == local

    # An adapter as PEFT writes it: no fedsvd sidecar, the Hub id as its base.
    server = fedsvd.Server(config)
    exported = Path(server.export(tmp_path / "adapter"))
    (exported / "fedsvd_adapter.json").unlink()
    adapter_config = json.loads((exported / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "some-org/tiny-bert"
    (exported / "adapter_config.json").write_text(json.dumps(adapter_config))
    found = fedsvd.BaseModel.for_adapter(exported, assets=assets)
    assert Path(found.path) == local
    assert found.hidden_size == model.hidden_size

    # Without the local copy the error names the id and where it looked.
    with pytest.raises(fedsvd.FedsvdError, match=r"some-org/tiny-bert.*models/tiny-bert"):
        fedsvd.BaseModel.for_adapter(exported, assets=tmp_path / "elsewhere")


def test_a_node_trains_on_a_file_of_its_own(tiny, tmp_path: Path) -> None:
    config = tiny("ffa")
    server = fedsvd.Server(config)
    names = server.label_names
    partition = server.sample(1)[0]
    # The node's rows, with labels by name (one class seen twice) and index.
    rows = [("a warm, funny film", names[1]), ("tedious", names[0]), ("loved it", names[1])]
    rows += [(f"review number {i}", str(i % 2)) for i in range(37)]
    own = tmp_path / "node.csv"
    own.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
    client = fedsvd.Client(
        config, partition, init_seed=server.init_seed, data_file=own, label_names=names
    )
    assert client.num_examples == len(rows)
    assert client.label_names == names
    builtin = fedsvd.Client(config, partition, init_seed=server.init_seed)
    assert builtin.num_examples != len(rows)
    # Its sampling rate, hence sigma, follow its own n_k.
    assert client.sample_rate != builtin.sample_rate
    update, report = client.train_round(server.state(), 1)
    assert report["examples"] == len(rows)
    # The same file again trains to the same (seeded) update; the server
    # takes it like any client's.
    again = fedsvd.Client(
        config, partition, init_seed=server.init_seed, data_file=own, label_names=names
    )
    update_again, _ = again.train_round(server.state(), 1)
    for key, value in update.items():
        np.testing.assert_array_equal(value, update_again[key])
    updates = [(partition, update, len(rows))]
    for k in server.sample(1)[1:]:
        other, other_report = fedsvd.Client(config, k, init_seed=server.init_seed).train_round(
            server.state(), 1
        )
        updates.append((k, other, other_report["examples"]))
    server.step(1, updates)
    assert server.rounds_done == 1

    # A label the run does not have is refused, naming it and the file.
    odd = tmp_path / "odd.csv"
    odd.write_text("text,label\nfine,maybe\n")
    with pytest.raises(fedsvd.FedsvdError, match=r"odd\.csv.*\"maybe\" is not one of the run's labels"):
        fedsvd.Client(config, partition, init_seed=server.init_seed, data_file=odd, label_names=names)


def test_the_endpoint_is_the_mean_of_the_last_five_evaluated_rounds() -> None:
    curve = [(r, 0.5 + 0.01 * r) for r in [1, 2, 4, 6, 8, 10, 9]]
    accuracy, rounds = fedsvd.endpoint(curve)
    assert rounds == [4, 6, 8, 9, 10]
    assert accuracy == pytest.approx(0.5 + 0.01 * sum(rounds) / 5, abs=1e-12)
    assert fedsvd.endpoint([(1, 0.7), (3, 0.9)]) == (pytest.approx(0.8), [1, 3])
    assert fedsvd.endpoint([]) is None
