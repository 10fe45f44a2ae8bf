"""`FederatedConfig`: every setting of a federated run, shared by the server and the devices.

    from dgst_tf.federated.config import FederatedConfig
    config = FederatedConfig(dataset="cifar10", clients=10, rounds=20, partition="dirichlet",
                             alpha=0.1, method="dgsu", encoding="int8", sram_budget="512KB")

The same object configures the simulation (`dgst_tf.federated.simulation`) and, read from a
Flower run config (`from_run_config`, hyphenated keys), a real deployment's ServerApp and
ClientApps (`dgst_tf.federated.app`).
"""
from __future__ import annotations

import dataclasses
import typing

from dgst_tf.federated.partition import SCHEMES
from dgst_tf.federated.payload import ENCODINGS
from dgst_tf.training.methods import METHODS


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """Data: ``dataset`` (a `dgst_tf.data.DATASETS` name), ``data_path``, ``train_examples``
    (the pool split over the clients), ``test_examples`` (the server's test set), ``classes``
    (0: from the dataset). Federation: ``clients``, ``rounds``, ``partition`` ("iid" or
    "dirichlet"), ``alpha``, ``per_channel`` (`aggregation`). Device: ``model``
    ("mobilenet_v2" or a saved tf-keras file), ``width``, ``image_size``, ``weights``
    ("imagenet" or None), ``method`` (`dgst_tf.training.methods`), ``target_fraction``,
    ``blocks``, ``int8`` (the device's int8 QAS step, `device`), ``learning_rate``,
    ``local_epochs`` (batch 1), ``sram_budget`` (None: no
    check), ``encoding`` of the uplink, ``clip_norm`` / ``noise_multiplier`` (device-level
    DP: each round's update clipped to that L2 norm plus Gaussian noise,
    `dgst_tf.federated.leakage.privacy`; clip norm 0: off). Simulation: ``num_cpus`` for
    Ray (one client per CPU at a time), ``round_timeout`` seconds."""
    dataset: str = "fashion_mnist"
    data_path: str | None = None
    train_examples: int = 500
    test_examples: int = 300
    classes: int = 0
    clients: int = 5
    rounds: int = 3
    partition: str = "iid"
    alpha: float = 1.0
    per_channel: bool = True
    model: str = "mobilenet_v2"
    width: float = 0.35
    image_size: int = 32
    weights: str | None = None
    method: str = "dgsu"
    target_fraction: float = 0.02
    blocks: int = 8
    int8: bool = False
    learning_rate: float = 0.01
    local_epochs: int = 1
    sram_budget: str | None = "512KB"
    encoding: str = "int8"
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    seed: int = 0
    num_cpus: int = 1
    round_timeout: float = 900.0

    def __post_init__(self):
        choices = {"partition": SCHEMES, "encoding": ENCODINGS, "method": METHODS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("clients", "rounds", "train_examples", "test_examples", "local_epochs",
                     "num_cpus", "image_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.alpha > 0 or not self.learning_rate > 0 or not self.round_timeout > 0:
            raise ValueError(f"alpha, learning_rate and round_timeout must be > 0, got "
                             f"{self.alpha}, {self.learning_rate}, {self.round_timeout}")
        if not (self.clip_norm >= 0 and self.noise_multiplier >= 0) or (
                self.noise_multiplier and not self.clip_norm):
            raise ValueError(f"clip_norm and noise_multiplier must be >= 0 and noise needs a "
                             f"clip_norm, got {self.clip_norm!r}, {self.noise_multiplier!r}")
        if self.train_examples < self.clients:
            raise ValueError(f"train_examples ({self.train_examples}) must be at least the "
                             f"number of clients ({self.clients})")

    def to_run_config(self) -> dict:
        """Flower run-config form (hyphenated keys, no None: "" stands for None)."""
        return {k.replace("_", "-"): ("" if v is None else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config) -> "FederatedConfig":
        """Read a Flower ``context.run_config`` (pyproject ``[tool.flwr.app.config]``);
        missing keys keep their defaults, unknown keys are an error.

            config = FederatedConfig.from_run_config({"clients": 10, "method": "dgsu"})
        """
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in dict(run_config).items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown federated setting {key!r}; known: {sorted(known)}")
            values[name] = _typed(hints[name], value)
        return cls(**values)


def _typed(hint, value):
    optional = type(None) in typing.get_args(hint)
    if optional and value in ("", None):
        return None
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if base is bool and isinstance(value, str):
        return parse_bool(value)
    return base(value)


def parse_bool(text: str) -> bool:
    """``True`` for true/1/yes, ``False`` for false/0/no (any case); else ValueError."""
    if str(text).lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return str(text).lower() in ("true", "1", "yes")
