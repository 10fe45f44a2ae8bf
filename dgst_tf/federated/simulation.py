"""Run a whole federation on one machine: Flower's simulation engine on Ray.

    from dgst_tf.federated.config import FederatedConfig
    from dgst_tf.federated.simulation import run_federated
    results = run_federated(FederatedConfig(clients=3, rounds=2), output_dir="fed_run")
    [r["accuracy"] for r in results["rounds"]]            # round 0 = the initial model
    [r["uplink_bytes"] for r in results["rounds"][1:]]    # per client, per round

The server's model is built and memory-checked here first, so a scheme that does not fit
the devices' SRAM stops before Ray starts. Ray gets ``config.num_cpus`` CPUs, one client
per CPU at a time, a small object store and no dashboard; TensorFlow in every worker uses
one thread. `flwr.simulation.run_simulation` runs the ServerApp in a thread of this process
and the ClientApps in Ray actors; it returns when the ServerApp ends (every round has a
timeout, ``config.round_timeout``).
"""
from __future__ import annotations

import os

from dgst_tf.federated.client import client_app, device_for
from dgst_tf.federated.client_data import with_classes
from dgst_tf.federated.config import FederatedConfig
from dgst_tf.federated.server import server_app

OBJECT_STORE_BYTES = 256 * 1024 * 1024
# Ray's workers inherit this process's environment: one TF thread each, no telemetry, and
# Ray's default worker niceness (+15) turned off: the workers do all the training, and at
# +15 a loaded machine starves them while the server waits.
_WORKER_ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
               "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
               "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
               "RAY_worker_niceness": "0"}


def backend_config(config: FederatedConfig) -> dict:
    """Flower's Ray backend settings for ``config``."""
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": int(config.num_cpus), "num_gpus": 0,
                          "object_store_memory": OBJECT_STORE_BYTES,
                          "include_dashboard": False}}


def run_federated(config: FederatedConfig, output_dir=None, verbose: bool = False) -> dict:
    """Simulate the federation of ``config``; the results dict (see `server.run_rounds`)."""
    from flwr.simulation import run_simulation

    for key, value in _WORKER_ENV.items():
        os.environ.setdefault(key, value)
    config = with_classes(config)
    device_for(config)  # build and memory-check the model before Ray starts
    results: dict = {}
    run_simulation(server_app(config, results, output_dir), client_app(config),
                   num_supernodes=config.clients, backend_config=backend_config(config),
                   verbose_logging=verbose)
    if "rounds" not in results:
        raise RuntimeError("the federated simulation ended without results (see the log)")
    return results
