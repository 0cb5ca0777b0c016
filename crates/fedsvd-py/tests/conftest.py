"""Shared fixtures: the fedsvd binary, the assets, a tiny random BERT."""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]


def fedsvd_bin() -> Path:
    """The `fedsvd` binary the package is compared with (`FEDSVD_BIN`, else
    the workspace's dev build)."""
    path = Path(os.environ.get("FEDSVD_BIN", ROOT / "target" / "debug" / "fedsvd"))
    if not path.is_file():
        pytest.fail(f"no fedsvd binary at {path}: run `cargo build -p fedsvd-cli` or set FEDSVD_BIN")
    return path


def run_cli(*args: str) -> str:
    """Runs the fedsvd binary and returns its stdout (fails on error)."""
    done = subprocess.run(
        [str(fedsvd_bin()), *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"fedsvd {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="session")
def assets() -> Path:
    path = Path(os.environ.get("FEDSVD_ASSETS", ROOT / "assets"))
    tokenizer = path / "models" / "all-MiniLM-L6-v2" / "tokenizer.json"
    if not tokenizer.is_file():
        pytest.fail(f"{tokenizer} is missing: run `cargo run -p fedsvd-cli -- assets fetch`")
    return path


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of float32 tensors."""
    header = {}
    offset = 0
    blobs = []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """A random BERT of hidden size 32 with MiniLM's vocabulary and
    tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    config = {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(5)
    h, ff = 32, 64
    t: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": rng.uniform(-1, 1, (30522, h)),
        "embeddings.position_embeddings.weight": rng.uniform(-0.5, 0.5, (64, h)),
        "embeddings.token_type_embeddings.weight": rng.uniform(-0.5, 0.5, (2, h)),
        "embeddings.LayerNorm.weight": 1 + rng.uniform(-0.2, 0.2, h),
        "embeddings.LayerNorm.bias": rng.uniform(-0.1, 0.1, h),
    }
    for layer in range(2):
        p = f"encoder.layer.{layer}"
        for name, rows, cols in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", ff, h),
            ("output.dense", h, ff),
        ]:
            scale = 1.7 / np.sqrt(cols)
            t[f"{p}.{name}.weight"] = rng.uniform(-scale, scale, (rows, cols))
            t[f"{p}.{name}.bias"] = rng.uniform(-0.1, 0.1, rows)
        for name in ["attention.output.LayerNorm", "output.LayerNorm"]:
            t[f"{p}.{name}.weight"] = 1 + rng.uniform(-0.2, 0.2, h)
            t[f"{p}.{name}.bias"] = rng.uniform(-0.1, 0.1, h)
    t["pooler.dense.weight"] = rng.uniform(-0.3, 0.3, (h, h))
    t["pooler.dense.bias"] = rng.uniform(-0.1, 0.1, h)
    write_safetensors(folder / "model.safetensors", t)
    tokenizer = assets / "models" / "all-MiniLM-L6-v2" / "tokenizer.json"
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return folder


def tiny_config(model: Path, method: str = "fedsvd", **overrides: object) -> dict:
    """A seeded quick-preset configuration on the tiny model: 4 clients, 2
    per round, 3 short rounds."""
    import fedsvd

    config = json.loads(fedsvd.preset("quick"))
    config["model"]["dir"] = str(model)
    config["model"]["max_len"] = 32
    config["data"].update(
        train_examples=160, test_examples=60, clients=4, min_examples_per_client=8
    )
    fed = config["federation"]
    if method == "fedsvd":
        fed["method"] = {"name": "fedsvd", "svd_period": 1, "svd_warmup": 0, "solver": "factored"}
    else:
        fed["method"] = {"name": method}
    fed.update(rounds=3, clients_per_round=2, eval_every=1, seed=3)
    fed["training"].update(local_steps=2, batch_size=16, physical_batch_size=16)
    for dotted, value in overrides.items():
        node = config
        *path, last = dotted.split("__")
        for key in path:
            node = node[key]
        node[last] = value
    return config


@pytest.fixture
def tiny(tiny_model: Path):
    """`tiny(method, **overrides)`: a tiny-model configuration."""
    return lambda method="fedsvd", **overrides: tiny_config(tiny_model, method, **overrides)
