"""Type stubs of the extension module ``fedsvd._core`` (see ``fedsvd``)."""

from os import PathLike
from typing import Any, Literal, TypedDict

import numpy as np
import numpy.typing as npt

__version__: str

Arrays = dict[str, npt.NDArray[np.float32]]
"""Adapter state or update: ``<module>.a`` (r x d_in), ``<module>.b``
(d_out x r), ``<module>.base_delta`` (d_out x d_in) and ``head``, float32."""

Config = str | dict[str, Any]
"""A complete run configuration: its JSON text or the parsed dict."""

Accountant = Literal["prv", "rdp"]

class FedsvdError(Exception):
    """An error of the fedsvd core; its message is the Rust error's."""

class BudgetExhaustedError(FedsvdError):
    """A client refused to train: one more round would exceed its budget."""

class RoundReport(TypedDict):
    """What ``Client.train_round`` reports besides the update."""

    examples: int
    """n_k, the client's number of examples (its aggregation weight)."""
    steps: int
    examples_seen: int
    mean_loss: float
    """Mean training loss (not covered by DP)."""
    clipped_fraction: float
    epsilon_spent: float | None
    """epsilon spent after this round (None without DP)."""

class StepReport(TypedDict):
    """What ``Server.step`` did."""

    refactorized: bool
    seconds: float

class Evaluation(TypedDict):
    """Held-out evaluation of the global model."""

    accuracy: float
    loss: float
    examples: int

class BaseModel:
    """A frozen base encoder, loaded once and shared read-only."""

    @staticmethod
    def load(
        path: str | PathLike[str] | None = None,
        assets: str | PathLike[str] | None = None,
    ) -> BaseModel:
        """Loads the model folder ``path`` (``config.json``,
        ``model.safetensors``, ``tokenizer.json``), or a Hugging Face Hub id
        such as ``sentence-transformers/all-MiniLM-L6-v2`` from its local
        copy under ``<assets>/models/`` (nothing is downloaded), or, without
        one, the fetched all-MiniLM-L6-v2 in the assets folder."""
    @staticmethod
    def for_adapter(
        adapter: str | PathLike[str],
        assets: str | PathLike[str] | None = None,
    ) -> BaseModel:
        """Loads the base model the PEFT adapter folder ``adapter`` applies
        to: the folder fedsvd recorded at export, else the adapter's
        ``base_model_name_or_path`` (a folder, or a Hub id read from its
        local copy under ``<assets>/models/``), else all-MiniLM-L6-v2."""
    @property
    def path(self) -> str:
        """The model folder."""
    @property
    def hidden_size(self) -> int:
        """Hidden size of the encoder."""
    @property
    def num_layers(self) -> int:
        """Number of transformer layers."""
    @property
    def vocab_size(self) -> int:
        """Vocabulary size."""

class Client:
    """One client of a federation: its data partition, its calibrated noise
    multiplier, its privacy ledger, and ``train_round``."""

    def __init__(
        self,
        config: Config,
        partition_id: int,
        *,
        model: BaseModel | None = None,
        assets: str | PathLike[str] | None = None,
        init_seed: int | None = None,
        data_file: str | PathLike[str] | None = None,
        label_names: list[str] | None = None,
    ) -> None:
        """Client ``partition_id`` of the run ``config``: partition
        ``partition_id`` of the configured data set (built-in, or the
        user's CSV/JSONL in ``data.file``), split and partitioned as
        ``fedsvd run`` does; sigma calibrated from its own n_k.
        With ``data_file`` (a real deployment's node), every row of that
        CSV/JSONL of its own instead, read with the run's columns
        (``text``/``label`` for a built-in data set), its labels matched
        by name or index to ``label_names`` (``Server.label_names``; by
        default the configured data set's); ``partition_id`` then only
        numbers the client. ``init_seed`` is the server's
        (``Server.init_seed``); a seeded run may omit it."""
    def train_round(self, global_state: Arrays, round: int) -> tuple[Arrays, RoundReport]:
        """Trains round ``round`` (from 1) from ``global_state`` and charges
        the ledger; returns what the method shares and a report. Raises
        ``BudgetExhaustedError`` (without training) at the budget."""
    def initial_state(self) -> Arrays:
        """The initial adapters of the server's seed."""
    def ledger_json(self) -> str:
        """The ledger as JSON text, to keep in the client's own file."""
    def restore_ledger(self, text: str) -> None:
        """Restores a ledger saved by ``ledger_json``; refuses one whose
        sampling rate, sigma, budget or accountant differ."""
    @property
    def partition_id(self) -> int:
        """The client's index k."""
    @property
    def num_examples(self) -> int:
        """Its number of training examples n_k."""
    @property
    def noise_multiplier(self) -> float:
        """Its calibrated noise multiplier sigma (0 without DP)."""
    @property
    def sample_rate(self) -> float:
        """Its Poisson sampling rate q = batch_size / n_k."""
    @property
    def epsilon_spent(self) -> float | None:
        """epsilon spent so far (None without DP)."""
    @property
    def epsilon_budget(self) -> float | None:
        """Its epsilon budget (None without DP)."""
    @property
    def method(self) -> str:
        """The method's short name."""
    @property
    def label_names(self) -> list[str]:
        """Label names, indexing the classifier's outputs."""

class Server:
    """The server of a federation: global adapters, the method's strategy,
    the held-out split. Rounds count from 1."""

    def __init__(
        self,
        config: Config,
        *,
        model: BaseModel | None = None,
        assets: str | PathLike[str] | None = None,
        init_seed: int | None = None,
    ) -> None:
        """The server of the run ``config``; it loads the data set for the
        held-out split."""
    def sample(self, round: int) -> list[int]:
        """The client indices sampled in ``round``, as ``fedsvd run``."""
    def evaluates_after(self, round: int) -> bool:
        """Whether ``fedsvd run`` evaluates after ``round``."""
    def state(self) -> Arrays:
        """A copy of the global state (what a sampled client receives)."""
    def step(self, round: int, updates: list[tuple[int, Arrays, int]]) -> StepReport:
        """The server step of ``round``: ``updates`` lists ``(partition_id,
        update, examples)``; aggregation by n_k, then the method's rule.
        All or nothing."""
    def evaluate(self) -> Evaluation:
        """Evaluates the global model on the held-out split."""
    def save_checkpoint(self, path: str | PathLike[str]) -> None:
        """Writes a sealed checkpoint atomically."""
    def load_checkpoint(self, path: str | PathLike[str]) -> None:
        """Continues from a checkpoint; a torn or edited one is refused."""
    def export(self, dir: str | PathLike[str]) -> str | None:
        """Exports the global model (PEFT adapter or merged checkpoint)."""
    def config_json(self) -> str:
        """The run configuration as ``config.json`` holds it."""
    @property
    def num_clients(self) -> int:
        """K."""
    @property
    def clients_per_round(self) -> int:
        """K'."""
    @property
    def rounds(self) -> int:
        """R."""
    @property
    def rounds_done(self) -> int:
        """Rounds done so far."""
    @property
    def finished(self) -> bool:
        """Whether every round has run."""
    @property
    def method(self) -> str:
        """The method's short name."""
    @property
    def trains_a(self) -> bool:
        """Whether clients upload A as well as B."""
    @property
    def seed(self) -> int | None:
        """The run seed (None: operating-system entropy)."""
    @property
    def init_seed(self) -> int:
        """The adapters' initialization seed every client must use."""
    @property
    def upload_bytes(self) -> int:
        """Bytes one client uploads per round."""
    @property
    def label_names(self) -> list[str]:
        """Label names."""
    @property
    def majority_accuracy(self) -> float:
        """The majority-class bar the run reports."""
    @property
    def test_examples(self) -> int:
        """The number of held-out examples `evaluate` scores."""

def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "prv",
) -> float:
    """epsilon of ``steps`` DP-SGD steps (``fedsvd privacy epsilon``)."""

def noise_multiplier(
    epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "prv",
    epsilon_tolerance: float = ...,
) -> float:
    """The smallest sigma reaching ``epsilon`` (``fedsvd privacy noise``)."""

def sample_clients(num_clients: int, per_round: int, seed: int | None, round: int) -> list[int]:
    """The client indices ``fedsvd run`` samples in ``round`` (from 1)."""

def endpoint(curve: list[tuple[int, float]]) -> tuple[float, list[int]] | None:
    """The run's endpoint as ``fedsvd run`` reports it: the mean accuracy
    over the last 5 evaluated rounds of ``(round, accuracy)`` pairs, and
    those rounds; ``None`` when nothing was evaluated."""

def nodes_for_clients(clients: list[int], nodes: list[tuple[int, int]]) -> list[int]:
    """The node ids serving ``clients``; ``nodes`` lists (node id,
    partition id)."""

def preset(name: Literal["quick", "default", "paper"]) -> str:
    """An embedded preset's complete configuration as JSON text."""

def canonical_json(kind: Literal["round", "summary", "config"], text: str) -> str:
    """A run-folder record re-serialized exactly as ``fedsvd run`` writes it."""

def default_assets_dir() -> str:
    """The default assets folder."""
