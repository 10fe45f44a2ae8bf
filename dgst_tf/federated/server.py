"""The Flower ServerApp: rounds of sparse federated fine-tuning, evaluated centrally.

    from dgst_tf.federated.server import server_app
    results = {}
    app = server_app(config, results)     # `results` is filled when the run ends

Each round sends the global model to every device (`ArrayRecord`, dense float32: the
downlink), waits for all replies (``config.round_timeout`` seconds at most; a device error,
for example a `MemoryBudgetError`, stops the run with the device's message), decodes the
sparse payloads, averages them per channel (`aggregation.aggregate`) and measures the
test accuracy of the new model. `results` (and ``output_dir/results.json``) hold the
accuracy per round and, per round and client, the uplink bytes, examples, channels sent and
training loss.
"""
from __future__ import annotations

import dataclasses
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from dgst_tf.core.files import write_json_atomically
from dgst_tf.federated import payload
from dgst_tf.federated.aggregation import aggregate
from dgst_tf.federated.client import (GLOBAL_MODEL, METRICS, PAYLOAD, ROUND, UPDATE,
                                      device_for)
from dgst_tf.federated.client_data import test_data, with_classes
from dgst_tf.federated.config import FederatedConfig

_NODE_WAIT_SECONDS = 60.0


def _nodes(grid: Grid, clients: int) -> list[int]:
    deadline = time.monotonic() + _NODE_WAIT_SECONDS
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= clients:
            return nodes[:clients]
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {clients} devices connected within "
                               f"{_NODE_WAIT_SECONDS:.0f} s")
        time.sleep(0.5)


def _round_messages(grid: Grid, nodes, weights, server_round: int) -> list[Message]:
    content = RecordDict({GLOBAL_MODEL: ArrayRecord(weights),
                          ROUND: ConfigRecord({"round": server_round})})
    return [Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                    group_id=str(server_round)) for node in nodes]


def _replies(grid: Grid, messages, server_round: int, timeout: float) -> list[Message]:
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = [r.error.reason for r in replies if r.has_error()]
    if failed:
        raise RuntimeError(f"round {server_round}: {len(failed)} device(s) failed: "
                           + " | ".join(str(f) for f in failed))
    if len(replies) < len(messages):
        raise TimeoutError(f"round {server_round}: {len(replies)} of {len(messages)} devices "
                           f"replied within {timeout:.0f} s")
    return replies


def _client_row(reply: Message) -> dict:
    metrics = reply.content[METRICS]
    return {"partition_id": int(metrics["partition-id"]),
            "num_examples": int(metrics["num-examples"]),
            "uplink_bytes": int(metrics["uplink-bytes"]),
            "channels_sent": int(metrics["channels-sent"]),
            "train_loss": float(metrics["train-loss"])}


def run_rounds(grid: Grid, config: FederatedConfig) -> dict:
    """All rounds of ``config`` over the devices of ``grid``; returns the results dict."""
    device = device_for(config)  # the server's copy: initial model and evaluation
    weights = device.weights()
    shapes = [w.shape for w in weights]
    x_test, y_test = test_data(config)
    nodes = _nodes(grid, config.clients)
    channels = sum(len(payload.by_channel(w)) for w in weights)
    rounds = [{"round": 0, "accuracy": device.accuracy(weights, x_test, y_test)}]
    for server_round in range(1, config.rounds + 1):
        start = time.monotonic()
        replies = _replies(grid, _round_messages(grid, nodes, weights, server_round),
                           server_round, config.round_timeout)
        updates = [(int(r.content[METRICS]["num-examples"]),
                    payload.decode(r.content[UPDATE][PAYLOAD], shapes)) for r in replies]
        weights, updaters = aggregate(weights, updates, per_channel=config.per_channel,
                                      integer_ranges=device.integer_ranges())
        clients = sorted((_client_row(r) for r in replies), key=lambda c: c["partition_id"])
        rounds.append({
            "round": server_round,
            "accuracy": device.accuracy(weights, x_test, y_test),
            "uplink_bytes": [c["uplink_bytes"] for c in clients],
            "downlink_bytes_per_client": int(sum(w.nbytes for w in weights)),
            "updated_channel_fraction": float(sum((u > 0).sum() for u in updaters) / channels),
            "clients": clients,
            "seconds": round(time.monotonic() - start, 2)})
    return {"config": dataclasses.asdict(config), "rounds": rounds,
            "dense_fp32_update_bytes": int(sum(w.nbytes for w in weights)),
            "training_peak_bytes": None if device.memory is None else
            int(device.memory.training_peak_bytes),
            "final_weights": weights}


def server_app(config: FederatedConfig | None = None, results: dict | None = None,
               output_dir=None) -> ServerApp:
    """A ServerApp running `run_rounds`; fills ``results`` (without the final weights:
    ``results["final_weights"]`` is kept only in memory) and writes
    ``output_dir/results.json``. ``config=None`` reads the Flower run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = run_rounds(grid, config or with_classes(
            FederatedConfig.from_run_config(context.run_config)))
        if results is not None:
            results.update(run)
        if output_dir is not None:
            write_json_atomically(f"{output_dir}/results.json",
                                  {k: v for k, v in run.items() if k != "final_weights"})

    return app
