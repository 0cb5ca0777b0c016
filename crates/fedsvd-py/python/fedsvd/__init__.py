"""fedsvd: differentially private federated fine-tuning of LoRA adapters.

The Rust core of fedsvd as a Python package, for deployments in which every
client runs where its data lives and the server runs elsewhere (the Flower
app in the repository's ``flower/`` folder uses it):

- :class:`BaseModel`: the frozen encoder, loaded once per process;
- :class:`Client`: one client's data partition, calibrated noise, privacy
  ledger and ``train_round`` (the same DP-SGD as ``fedsvd run``);
- :class:`Server`: the simulation's sampling, server step (FedSVD's SVD
  refactorization, FLoRA's merge, ...), evaluation, checkpoints and export;
- :func:`sample_clients` / :func:`nodes_for_clients`: which clients a round
  samples, and which node serves each (by partition id);
- :func:`epsilon` / :func:`noise_multiplier`: the accountants;
- :func:`endpoint`: the run's headline accuracy (the last 5 evaluated
  rounds' mean), as ``fedsvd run`` reports it.

Arrays cross as ``dict[str, numpy.ndarray]`` of float32 (keys
``<module>.a``, ``<module>.b``, ``<module>.base_delta``, ``head``). Every
error is a :class:`FedsvdError` carrying the Rust message; a client asked to
train past its budget raises :class:`BudgetExhaustedError`.
"""

from ._core import (
    BaseModel,
    BudgetExhaustedError,
    Client,
    FedsvdError,
    Server,
    __version__,
    canonical_json,
    default_assets_dir,
    endpoint,
    epsilon,
    noise_multiplier,
    nodes_for_clients,
    preset,
    sample_clients,
)

__all__ = [
    "BaseModel",
    "BudgetExhaustedError",
    "Client",
    "FedsvdError",
    "Server",
    "__version__",
    "canonical_json",
    "default_assets_dir",
    "endpoint",
    "epsilon",
    "noise_multiplier",
    "nodes_for_clients",
    "preset",
    "sample_clients",
]
