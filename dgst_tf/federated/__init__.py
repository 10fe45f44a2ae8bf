"""Federated sparse fine-tuning on Flower: many simulated microcontrollers learn together.

`config` (`FederatedConfig`: every setting), `partition` (IID / Dirichlet non-IID splits),
`client_data` (each device's images), `device` (one microcontroller: the batch-1 sparse step
in its SRAM budget), `payload` (the sparse int8/fp16 uplink format), `aggregation` (per-channel
FedAvg and why), `client` / `server` (the Flower ClientApp and ServerApp), `simulation`
(everything on one machine on Ray) and `app` (the same apps for a real deployment).

    from dgst_tf.federated import FederatedConfig, run_federated
    results = run_federated(FederatedConfig(dataset="fashion_mnist", clients=5, rounds=3))
"""
import importlib

_PUBLIC = {
    "FederatedConfig": "config",
    "run_federated": "simulation",
    "aggregate": "aggregation",
    "client_app": "client",
    "server_app": "server",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
