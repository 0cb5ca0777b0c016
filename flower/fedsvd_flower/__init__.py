"""fedsvd on Flower: a ServerApp whose strategy is fedsvd's server step and
a ClientApp whose training is fedsvd's DP-SGD client, both from the Rust
core (the ``fedsvd`` package)."""
