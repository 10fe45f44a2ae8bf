"""Which conv -> depthwise -> 1x1 conv chains run as one fused block: the one rule shared by the
Keras graph (the memory model's ``fused_blocks``, `dgst_tf.planning.memory_graph`) and the
int8 `.tflite` (the exporter's ``DGST_FUSED_BLOCK``, `dgst_tf.export.block_fusion`).

Each side describes its ops in the same neutral terms (`ChainOp`) and asks `fusable_chains`;
nothing here knows Keras or TFLite, so both sides always agree::

    from dgst_tf.core.block_fusion_rule import ChainOp, fusable_chains

    ops = [ChainOp("conv", inputs=(0,), output=1, kernel=(3, 3), activation="relu6"),
           ChainOp("depthwise", inputs=(1,), output=2, kernel=(3, 3), activation="relu6"),
           ChainOp("conv", inputs=(2,), output=3)]
    fusable_chains(ops, graph_io={0, 3})   # [(0, 1, 2)]

A chain ``(a, b, c)`` fuses when a is a conv, b a depthwise conv with depth multiplier 1 and a
kernel at most `MAX_DEPTHWISE_KERNEL_HEIGHT` rows high, c a 1x1 conv with stride 1; none is
dilated; each applies no activation, ReLU or ReLU6 (what the fused kernel clamps to); all are
int8 with constant weights; the output of a is read only by b and that of b only by c (as
their first input), and neither is a graph input or output. This module imports nothing but
the standard library.
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Iterable, Sequence

__all__ = ["ChainOp", "FUSABLE_ACTIVATIONS", "MAX_DEPTHWISE_KERNEL_HEIGHT", "fusable",
           "fusable_chains"]

# DGST_FUSED_BLOCK_MAX_DW_H in tflm_ops/core/dgst_train_kernels.h: the rows the fused kernel
# keeps of the expanded activation.
MAX_DEPTHWISE_KERNEL_HEIGHT = 16
FUSABLE_ACTIVATIONS = ("none", "relu", "relu6")


@dataclasses.dataclass(frozen=True)
class ChainOp:
    """One op of a graph, as the fusion rule sees it.

    ``kind``: "conv", "depthwise" or anything else (never fused); ``inputs``: the tensors it
    reads, first the activation (weights and biases may follow); ``output``: the tensor it
    writes. ``activation``: what is applied to the output ("none", "relu", "relu6" or another
    name). ``int8``: int8 activations with constant weights and biases (what the fused
    kernel computes).
    """

    kind: str
    inputs: tuple
    output: Hashable
    kernel: tuple = (1, 1)
    strides: tuple = (1, 1)
    dilation: tuple = (1, 1)
    depth_multiplier: int = 1
    activation: str = "none"
    int8: bool = True


def fusable(conv: ChainOp, depthwise: ChainOp, project: ChainOp) -> bool:
    """Whether three ops, already linked output to first input, compute as one fused block.

        fusable(ChainOp("conv", (0,), 1), ChainOp("depthwise", (1,), 2, kernel=(3, 3)),
                ChainOp("conv", (2,), 3))   # True
    """
    chain = (conv, depthwise, project)
    return ((conv.kind, depthwise.kind, project.kind) == ("conv", "depthwise", "conv")
            and all(tuple(op.dilation) == (1, 1) for op in chain)
            and all(op.activation in FUSABLE_ACTIVATIONS and op.int8 for op in chain)
            and depthwise.depth_multiplier == 1
            and depthwise.kernel[0] <= MAX_DEPTHWISE_KERNEL_HEIGHT
            and tuple(project.kernel) == (1, 1) and tuple(project.strides) == (1, 1))


def fusable_chains(ops: Sequence[ChainOp], stop: int | None = None,
                   graph_io: Iterable = ()) -> list:
    """``[(a, b, c), ...]``: indices into ``ops`` (in execution order) of the chains among the
    first ``stop`` ops (all by default) that `fusable` accepts, each op in at most one chain.

    ``graph_io``: tensors that must stay visible (graph inputs and outputs).
    """
    stop = len(ops) if stop is None else int(stop)
    pinned = set(graph_io)
    readers: dict = {}
    for index, op in enumerate(ops):
        for tensor in op.inputs:
            readers.setdefault(tensor, []).append(index)

    def only_reader(index):
        tensor = ops[index].output
        users = readers.get(tensor, [])
        if tensor in pinned or len(users) != 1 or users[0] >= stop:
            return None
        return users[0] if ops[users[0]].inputs[0] == tensor else None

    chains, used = [], set()
    for a in range(stop):
        if a in used or ops[a].kind != "conv":
            continue
        b = only_reader(a)
        c = only_reader(b) if b is not None else None
        if c is not None and fusable(ops[a], ops[b], ops[c]):
            chains.append((a, b, c))
            used |= {a, b, c}
    return chains
