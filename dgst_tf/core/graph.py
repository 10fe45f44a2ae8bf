"""Walking and rebuilding tf-keras functional graphs.

Every graph transformation in dgst-tf (BatchNorm folding, the sparse-update graph, the
int8 simulation, channel removal) is "call the same layers again on new inputs, swapping
some of them". `rebuild` does exactly that::

    from dgst_tf.core.graph import rebuild

    def drop_dropout(layer, args, kwargs):
        if isinstance(layer, keras.layers.Dropout):
            return args[0]            # identity: the layer disappears
        return layer(*args, **kwargs) # the same layer (same variables) on the new tensors

    smaller = rebuild(model, drop_dropout)
"""
from typing import Callable, Iterator

from dgst_tf.core.keras_compat import keras, require_keras2, tf
from tf_keras.src.engine.keras_tensor import KerasTensor

LayerCall = Callable[[keras.layers.Layer, tuple, dict], object]


class UnsupportedModelError(ValueError):
    """The model's structure is outside what dgst-tf supports (names the layer at fault)."""


def check_functional(model: keras.Model, where: str) -> keras.Model:
    """Raise unless ``model`` is a tf-keras functional (or Sequential) model."""
    require_keras2(model, where)
    if not getattr(model, "_is_graph_network", False):
        raise UnsupportedModelError(
            f"{where}: model {model.name!r} is a subclassed keras.Model; dgst-tf needs a "
            "functional or Sequential model whose layer graph it can read")
    return model


def nodes_in_order(model: keras.Model) -> Iterator:
    """The model's layer calls (keras Nodes) in execution order, input nodes excluded."""
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if not node.is_input:
                yield node


def _substitute(structure, tensors: dict):
    def swap(value):
        if isinstance(value, KerasTensor):
            return tensors[str(id(value))]
        return value

    return tf.nest.map_structure(swap, structure)


def rebuild(model: keras.Model, call_layer: LayerCall | None = None,
            name: str | None = None) -> keras.Model:
    """A new functional model computing ``model`` with ``call_layer`` deciding each call.

    ``call_layer(layer, args, kwargs)`` returns the output tensor(s) for that layer call:
    call the layer itself to keep it (its variables are shared, not copied), call a
    replacement, or return an input to remove the layer.
    """
    check_functional(model, "rebuild")
    call_layer = call_layer or (lambda layer, args, kwargs: layer(*args, **kwargs))
    tensors = {}
    new_inputs = []
    for old, input_layer in zip(model.inputs, model._input_layers):
        new = keras.Input(type_spec=old.type_spec, name=input_layer.name)
        tensors[str(id(old))] = new
        new_inputs.append(new)
    for node in nodes_in_order(model):
        args, kwargs = _substitute((node.call_args, node.call_kwargs), tensors)
        outputs = call_layer(node.layer, tuple(args), dict(kwargs))
        for out_id, value in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
            tensors[out_id] = value
    outputs = [tensors[str(id(o))] for o in model.outputs]
    return keras.Model(new_inputs, outputs if len(outputs) > 1 else outputs[0],
                       name=name or model.name)


def consumers(model: keras.Model) -> dict[str, list[str]]:
    """For each layer name, the names of the layers that read its output."""
    result = {layer.name: [] for layer in model.layers}
    for node in nodes_in_order(model):
        for parent in node.parent_nodes:
            # a Sequential model's input layer is not in model.layers
            result.setdefault(parent.layer.name, []).append(node.layer.name)
    return result


def producers(model: keras.Model) -> dict[str, list[str]]:
    """For each layer name, the names of the layers whose outputs it reads."""
    result = {layer.name: [] for layer in model.layers}
    for node in nodes_in_order(model):
        result[node.layer.name] = [parent.layer.name for parent in node.parent_nodes]
    return result


def check_single_use(model: keras.Model, where: str) -> None:
    """Raise if a layer is called more than once inside ``model`` (shared layers)."""
    seen = set()
    for node in nodes_in_order(model):
        if node.layer.name in seen:
            raise UnsupportedModelError(
                f"{where}: layer {node.layer.name!r} ({type(node.layer).__name__}) is called "
                "more than once; shared layers are not supported")
        seen.add(node.layer.name)


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy of ``model``: same graph, its own variables holding the same
    weights (a distillation teacher, a fresh start). Example::

        teacher = copy_model(model)
    """
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy
