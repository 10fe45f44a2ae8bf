"""The training graph while it is being built: the editor, the plan, and the ops and tensors
each phase adds (variables, forward records, backward and update ops).

Each phase (`forward`, `backward`, `update`) takes a `TrainingGraph` and appends to it; the
builder finally orders the ops as: variable initialisation, on-device channel selection,
the forward pass (with what each op needs before and after it), backward and updates.
"""
from __future__ import annotations

import collections
import dataclasses

from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.training.plan import TrainedLayer, TrainingPlan

__all__ = ["ExportSettings", "TrainingGraph"]


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """The options of `export_training` (see its docstring)."""

    learning_rate: float
    selection: object = "magnitude"  # "magnitude", "first" or {layer: channels}
    policy: str | None = None  # None, "traversal" or "magnitude"
    num_samples: int = 100
    fold_pads: bool = True
    fuse_blocks: bool = True
    kept_weights_in_ram: bool = True
    output_params: bool = True
    rounding: str = "stochastic"  # weight updates: "stochastic" or "nearest"
    seed: int = 0  # of stochastic rounding
    requant_in_flash: bool = True  # convolutions as DGST_CONV2D (`flash_requant`)
    layers_per_step: int | None = None  # the layer schedule (`schedule`); None: all layers
    offline_plan: bool = True  # the arena's offline memory plan, in place ops (`offline_plan`)
    weight_grad_chunk_bytes: int = 0  # largest int32 weight-gradient chunk; 0: whole (`backward`)


@dataclasses.dataclass
class TrainingGraph:
    """The build state of one training-step graph."""

    editor: ModelEditor
    plan: TrainingPlan
    settings: ExportSettings
    where: str  # "export_training(<path>)", prefixes every error
    init_ops: list = dataclasses.field(default_factory=list)  # DGST_VARIABLE_INIT
    selection_ops: list = dataclasses.field(default_factory=list)  # DGST_SELECT_CHANNELS
    # forward op index -> ops placed just before / just after it
    ops_before: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    ops_after: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    backward_ops: list = dataclasses.field(default_factory=list)  # gradients and updates
    layers: dict = dataclasses.field(default_factory=dict)  # op index -> TrainedLayer
    params: list = dataclasses.field(default_factory=list)  # manifest "params" entries
    relu_masks: dict = dataclasses.field(default_factory=dict)  # op index -> mask tensor
    kept_inputs: dict = dataclasses.field(default_factory=dict)  # op index -> kept input
    label: int = -1  # the int32 label input
    loss: int = -1  # the float32 loss output
    sgd_step: int = -1  # the int32 step counter sgd/step (a variable; `schedule`)

    def layers_in_order(self) -> list[TrainedLayer]:
        return sorted(self.layers.values(), key=lambda layer: layer.op_index)

    def dynamic_layers(self) -> list[TrainedLayer]:
        """Layers whose kept channels are chosen on device (extra ``<layer>/kept`` outputs)."""
        return [layer for layer in self.layers_in_order() if layer.policy]

    def forward_ops(self) -> list:
        """The forward ops with what the training step adds around each."""
        ordered = []
        for index, op in enumerate(self.plan.ops):
            ordered += self.ops_before[index] + [op] + self.ops_after[index]
        return ordered
