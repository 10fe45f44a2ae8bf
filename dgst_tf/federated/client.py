"""The Flower ClientApp: one simulated microcontroller per SuperNode.

    from dgst_tf.federated.client import client_app
    app = client_app(config)        # None: read the config from the Flower run config

A train message carries the global model (`ArrayRecord` ``"global-model"``) and the round
(`ConfigRecord` ``"round"``). The device (`SimulatedDevice`, built and memory-checked once
per process) trains on its partition (``context.node_config["partition-id"]``), and replies
with only what it changed: the `payload` bytes (``"update"`` / ``"payload"``) and a
`MetricRecord` ``"metrics"`` with ``num-examples``, ``uplink-bytes`` (= len(payload)),
``channels-sent``, ``train-loss``. Its channel-selection state stays on the device between
rounds (``context.state``, Flower's per-node state).
"""
from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dgst_tf.federated import payload
from dgst_tf.federated.client_data import calibration_images, client_data, with_classes
from dgst_tf.federated.config import FederatedConfig
from dgst_tf.federated.device import SimulatedDevice
from dgst_tf.federated.leakage.privacy import clip_and_noise_entries

GLOBAL_MODEL, ROUND, UPDATE, PAYLOAD, METRICS = (
    "global-model", "round", "update", "payload", "metrics")
_SELECTION = "selection-state"
_DEVICES: dict = {}  # one built model per process and config, shared by its devices


def device_for(config: FederatedConfig) -> SimulatedDevice:
    """This process's `SimulatedDevice` for ``config`` (built, and memory-checked, once)."""
    if config not in _DEVICES:
        calibration = calibration_images(config) if config.int8 else None
        _DEVICES[config] = SimulatedDevice(config, calibration)
    return _DEVICES[config]


def device_update(config: FederatedConfig, weights, partition_id: int, server_round: int,
                  selection_state=None) -> tuple[bytes, dict, list]:
    """What device ``partition_id`` sends in ``server_round`` after training from the global
    ``weights``: (payload bytes, metrics, its selection state after the round).

        blob, metrics, state = device_update(config, weights, 0, server_round=1)
    """
    device = device_for(config)
    images, labels = client_data(config, partition_id)
    device.set_selection_state(selection_state)
    seed = config.seed * 1_000_003 + server_round * 1009 + partition_id
    after, loss = device.train(weights, images, labels, seed=seed)
    entries = payload.sparse_update(weights, after)
    if config.clip_norm:  # device-level DP: the released update is clipped and noised
        entries = clip_and_noise_entries(entries, config.clip_norm, config.noise_multiplier,
                                         seed)
    blob = payload.encode(entries, config.encoding)
    metrics = {"num-examples": len(labels), "uplink-bytes": len(blob),
               "channels-sent": int(sum(len(e.channels) for e in entries)),
               "train-loss": loss, "partition-id": int(partition_id)}
    return blob, metrics, device.selection_state()


def local_round(config: FederatedConfig, message: Message, context: Context) -> Message:
    """`device_update` for this node (``context.node_config["partition-id"]``), its
    selection state kept in ``context.state``; the reply carries the payload and metrics."""
    saved = context.state.array_records.get(_SELECTION)
    blob, metrics, state = device_update(
        config, message.content[GLOBAL_MODEL].to_numpy_ndarrays(),
        int(context.node_config["partition-id"]), int(message.content[ROUND]["round"]),
        None if saved is None else saved.to_numpy_ndarrays())
    context.state[_SELECTION] = ArrayRecord(state)
    content = RecordDict({UPDATE: ConfigRecord({PAYLOAD: blob}),
                          METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=message)


def client_app(config: FederatedConfig | None = None) -> ClientApp:
    """A ClientApp running `local_round`; with ``config=None`` each message reads
    `FederatedConfig.from_run_config(context.run_config)` (a real deployment)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return local_round(config or with_classes(
            FederatedConfig.from_run_config(context.run_config)), message, context)

    return app
