"""The classifier of a Keras CNN, in one place: which layer it is, whether it is a Dense layer or
a 1x1 Conv2D on the globally pooled map (MobileNet v1 / v3 and many MCU models), and whether a
softmax follows it. Every stage (sparse training, selection, memory model, int8 simulation,
training export) asks this module instead of looking for "the last Dense layer" itself.

    from dgst_tf.core.classifier import find_classifier, logits_model, training_form

    head = find_classifier(model)
    head.layer, head.kind, head.softmax     # the layer, "dense" | "conv1x1", None | layer name
    trainable = training_form(model)        # Dense classifier; a softmax is its own last layer
    logits = logits_model(model)            # training_form without the softmax (training)

The rules:

- The classifier is the last Conv2D / DepthwiseConv2D / Dense layer in execution order; its
  output must reach the model's one output through shape-only layers (Flatten, Reshape,
  Dropout, a linear Activation) and at most one softmax (its own activation, a ``Softmax``
  layer or ``Activation("softmax")``). Any other activation there (sigmoid, ReLU...) is
  refused: the training step's loss is softmax cross-entropy on logits.
- A Conv2D classifier must be a 1x1 convolution of the globally pooled map (the "head": the
  layers after the last GlobalAveragePooling2D / GlobalMaxPooling2D it reads from). Every
  tensor of the head is a vector stored as a [1, 1, C] map, so `training_form` writes the head
  as what it computes: the pooling without ``keepdims``, each 1x1 Conv2D as a Dense layer of the
  same name and weights, Flatten / Reshape as nothing. The model computes the same function;
  update schemes, which name layers, apply to both forms (`head_dense_layers` lets `conv_layers`
  count the head's convolutions as dense layers in both).
- Training is on logits: `training_form` splits a classifier's own softmax into a last
  ``Softmax`` layer (kept for inference), and `logits_model` drops it (sharing the variables).
  `SparseUpdateModel` trains its logits graph and hands the loss the softmax of the logits,
  which Keras' cross-entropy turns back into the logits exactly; the exported training step
  computes the softmax cross-entropy gradient from the logits and its inference model keeps
  no softmax (the argmax is the same).
"""
from __future__ import annotations

import dataclasses
import weakref

from dgst_tf.core.graph import (UnsupportedModelError, check_functional, copy_model,
                                nodes_in_order, rebuild)
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import CONV2D, DENSE, DEPTHWISE, kind_of

__all__ = ["ClassifierError", "ClassifierHead", "find_classifier", "head_dense_layers",
           "training_form", "logits_model", "with_new_classifier", "is_softmax_layer"]

GLOBAL_POOLS = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
# layers that may sit between the classifier and the model output (besides a softmax)
_SHAPE_ONLY = (keras.layers.Flatten, keras.layers.Reshape, keras.layers.Dropout)
# the int8 training graph's own layers after its classifier: requantize, dequantize the logits
_INT8_SIMULATION = ("dgst_tf.training.int8_ops",)
_FOUND = weakref.WeakKeyDictionary()  # model -> ClassifierHead (a built graph never changes)


class ClassifierError(UnsupportedModelError):
    """The model has no classifier dgst-tf can train (names the layer and what is wrong)."""


@dataclasses.dataclass(frozen=True)
class ClassifierHead:
    """The classifier of a model and what surrounds it.

    ``kind``: "dense" or "conv1x1" (a 1x1 Conv2D of the pooled map); ``softmax``: None
    (the model outputs logits), "activation" (the classifier's own activation) or the name of
    the Softmax / Activation("softmax") layer; ``pooling``: the global pooling layer the head
    reads (None if the classifier does not read a pooled map); ``head_convs``: the Conv2D
    layers of the head (all 1x1, classifier included), which `training_form` makes Dense;
    ``tail``: the layers between the classifier and the output.
    """

    layer: keras.layers.Layer
    kind: str
    softmax: str | None
    pooling: str | None = None
    head_convs: tuple = ()
    tail: tuple = ()

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def outputs_logits(self) -> bool:
        return self.softmax is None

    @property
    def in_training_form(self) -> bool:
        """Dense classifier with a linear activation, no convolution in the head."""
        return not self.head_convs and self.softmax != "activation"


def is_softmax_layer(layer) -> bool:
    """A ``Softmax`` layer over the last axis or an ``Activation("softmax")``."""
    if isinstance(layer, keras.layers.Softmax):
        return layer.axis in (-1, [-1], (-1,))
    return isinstance(layer, keras.layers.Activation) and _activation_name(layer) == "softmax"


def _activation_name(layer) -> str:
    return getattr(getattr(layer, "activation", None), "__name__", "linear")


def _is_linear_activation_layer(layer) -> bool:
    return isinstance(layer, keras.layers.Activation) and _activation_name(layer) == "linear"


def find_classifier(model: keras.Model) -> ClassifierHead:
    """The `ClassifierHead` of ``model``; raises `ClassifierError` naming the layer when
    the model has no classifier dgst-tf can train (see the module doc). Example::

        head = find_classifier(keras.applications.MobileNet(alpha=0.25, weights=None))
        head.name, head.kind, head.softmax   # 'conv_preds', 'conv1x1', 'predictions'
    """
    try:
        return _FOUND[model]
    except (KeyError, TypeError):
        pass
    head = _find(model)
    try:
        _FOUND[model] = head
    except TypeError:
        pass
    return head


def _find(model) -> ClassifierHead:
    check_functional(model, "find_classifier")
    nodes = list(nodes_in_order(model))
    weighted = [n for n in nodes if kind_of(n.layer) is not None]
    if not weighted:
        raise ClassifierError(f"model {model.name!r} has no classifier: no Dense or Conv2D "
                              "layer")
    node = weighted[-1]
    layer = node.layer
    if len(model.outputs) != 1:
        raise ClassifierError(f"model {model.name!r} has {len(model.outputs)} outputs; the "
                              "classifier must produce the only one")
    tail, softmax = _tail(model, nodes, node)
    own = _activation_name(layer)
    if own == "softmax":
        if softmax is not None:
            raise ClassifierError(f"classifier {layer.name!r} has a softmax activation and "
                                  f"is followed by softmax layer {softmax!r}")
        softmax = "activation"
    elif own != "linear":
        raise ClassifierError(f"classifier {layer.name!r} has activation {own!r}; the "
                              "classifier must output logits or a softmax of them")
    kind = kind_of(layer)
    if kind is DENSE:
        try:
            pooling, zone = _head_zone(model, nodes, node, required=False)
        except ClassifierError:  # it reads a map, not a pooled vector: no head to rewrite
            pooling, zone = None, []
        convs = tuple(n.layer.name for n in zone if kind_of(n.layer) is CONV2D)
        return ClassifierHead(layer, "dense", softmax, pooling, convs, tail)
    if kind is DEPTHWISE:
        raise ClassifierError(f"classifier {layer.name!r} is a DepthwiseConv2D; the classifier "
                              "must be a Dense layer or a 1x1 Conv2D of the pooled map")
    pooling, zone = _head_zone(model, nodes, node, required=True)
    convs = tuple(n.layer.name for n in zone if kind_of(n.layer) is CONV2D)
    return ClassifierHead(layer, "conv1x1", softmax, pooling, convs, tail)


def _consumer_nodes(nodes) -> dict:
    """id(node) -> the nodes that read its output."""
    readers = {id(n): [] for n in nodes}
    for n in nodes:
        for parent in n.parent_nodes:
            if id(parent) in readers:
                readers[id(parent)].append(n)
    return readers


def _tail(model, nodes, classifier_node) -> tuple[tuple, str | None]:
    """(layers from the classifier to the output, the softmax layer's name or None)."""
    readers = _consumer_nodes(nodes)
    output_layer = model.outputs[0]._keras_history.layer
    tail, softmax, node = [], None, classifier_node
    while node.layer is not output_layer:
        after = readers[id(node)]
        if len(after) != 1:
            raise ClassifierError(
                f"the output of classifier {classifier_node.layer.name!r} is read by "
                f"{len(after)} layers; it must lead straight to the model output")
        node = after[0]
        layer = node.layer
        if is_softmax_layer(layer):
            if softmax is not None:
                raise ClassifierError(f"layers {softmax!r} and {layer.name!r} both apply a "
                                      "softmax to the classifier's output")
            softmax = layer.name
        elif not (isinstance(layer, _SHAPE_ONLY) or _is_linear_activation_layer(layer)
                  or type(layer).__module__ in _INT8_SIMULATION):
            raise ClassifierError(
                f"layer {layer.name!r} ({type(layer).__name__}) follows classifier "
                f"{classifier_node.layer.name!r}; only Flatten, Reshape, Dropout and a softmax "
                "may (the training loss is softmax cross-entropy on the logits)")
        tail.append(layer.name)
    return tuple(tail), softmax


def _ancestors(node, inside: set) -> set:
    """ids of the nodes ``node`` reads from, transitively (within ``inside``)."""
    seen, todo = set(), [node]
    while todo:
        for parent in todo.pop().parent_nodes:
            if id(parent) in inside and id(parent) not in seen:
                seen.add(id(parent))
                todo.append(parent)
    return seen


def _head_zone(model, nodes, classifier_node, required: bool):
    """(the pooling layer's name, the nodes after it): the head the classifier reads, every
    tensor of which is a pooled vector. ``required``: raise if there is none."""
    ids = {id(n) for n in nodes}
    upstream = _ancestors(classifier_node, ids)
    pools = [n for n in nodes if id(n) in upstream and isinstance(n.layer, GLOBAL_POOLS)]
    name = classifier_node.layer.name
    if not pools:
        if required:
            raise ClassifierError(
                f"classifier {name!r} is a Conv2D that reads no global pooling layer; a Conv2D "
                "classifier must be a 1x1 convolution of the globally pooled map "
                "(GlobalAveragePooling2D / GlobalMaxPooling2D)")
        return None, []
    pool = pools[-1]
    zone_ids, zone = {id(pool)}, []
    for n in nodes[nodes.index(pool) + 1:]:
        parents = [id(p) for p in n.parent_nodes]
        if not any(p in zone_ids for p in parents):
            continue
        if not all(p in zone_ids for p in parents):
            raise ClassifierError(
                f"layer {n.layer.name!r} mixes the pooled map of {pool.layer.name!r} with "
                "another tensor; the head after the global pooling must read only it")
        _check_head_layer(n, pool.layer.name)
        zone_ids.add(id(n))
        zone.append(n)
    if id(classifier_node) not in zone_ids:
        raise ClassifierError(f"classifier {name!r} does not read the pooled map of "
                              f"{pool.layer.name!r}")
    return pool.layer.name, zone


def _check_head_layer(node, pool: str) -> None:
    """A head layer must keep the pooled vector a vector; a conv there must be 1x1."""
    layer = node.layer
    shapes = node.output_shapes if isinstance(node.output_shapes, list) else [
        node.output_shapes]
    for shape in shapes:
        dims = list(shape)[1:-1]
        if any(d != 1 for d in dims):
            raise ClassifierError(
                f"layer {layer.name!r} after global pooling {pool!r} outputs shape "
                f"{tuple(shape)[1:]}; the head must keep the pooled vector (spatial size 1)")
    kind = kind_of(layer)
    if kind is DEPTHWISE:
        raise ClassifierError(f"layer {layer.name!r} is a DepthwiseConv2D after global "
                              f"pooling {pool!r}; only 1x1 Conv2D and Dense layers may be")
    if kind is CONV2D and (tuple(layer.kernel_size) != (1, 1) or int(layer.groups) != 1):
        raise ClassifierError(
            f"layer {layer.name!r} is a {layer.kernel_size[0]}x{layer.kernel_size[1]} Conv2D "
            f"(groups={layer.groups}) after global pooling {pool!r}; a Conv2D there must be a "
            "1x1 convolution (it then is a Dense layer)")


def head_dense_layers(model: keras.Model) -> set:
    """Names of the Conv2D layers that are Dense layers of the pooled vector (the classifier
    and the other 1x1 convs after global pooling; empty if the model has no classifier)."""
    try:
        return set(find_classifier(model).head_convs)
    except ClassifierError:
        return set()


def training_form(model: keras.Model, name: str | None = None) -> keras.Model:
    """``model`` with its head written as `find_classifier` describes it: a Dense classifier
    with a linear activation, the head after the global pooling on vectors (its 1x1 Conv2D
    layers Dense, same names and weights), a classifier softmax as a last ``Softmax`` layer.
    The same model object when it is in that form already; otherwise a new model that shares
    every other layer (and its variables) with ``model``. Example::

        trainable = training_form(keras.applications.MobileNetV3Small(
            (32, 32, 3), alpha=0.75, minimalistic=True, weights=None, classes=10))
        trainable.get_layer("Logits")        # a Dense layer with the conv's weights
    """
    head = find_classifier(model)
    if head.in_training_form:
        return model
    convs = set(head.head_convs)
    vectors = set(head.tail) | _head_names(model, head)

    def call_layer(layer, args, kwargs):
        if layer.name == head.pooling and getattr(layer, "keepdims", False):
            pool = type(layer).from_config({**layer.get_config(), "keepdims": False})
            return pool(*args, **kwargs)
        if layer is head.layer:
            logits = _as_dense(layer, args[0], keras.activations.linear)
            if head.softmax == "activation":
                return keras.layers.Softmax(name=f"{layer.name}_softmax")(logits)
            return logits
        if layer.name in convs:
            return _as_dense(layer, args[0], layer.activation)
        if layer.name in vectors and isinstance(layer, (keras.layers.Flatten,
                                                        keras.layers.Reshape)):
            return args[0]  # the vector already is one
        return layer(*args, **kwargs)

    return rebuild(model, call_layer, name=name or model.name)


def _head_names(model, head) -> set:
    """Names of the layers after the head's pooling layer (the pooled-vector zone)."""
    if head.pooling is None:
        return set()
    nodes = list(nodes_in_order(model))
    ids = {id(n) for n in nodes}
    pool = next(n for n in nodes if n.layer.name == head.pooling)
    return {n.layer.name for n in nodes[nodes.index(pool) + 1:]
            if id(pool) in _ancestors(n, ids)}


def _as_dense(layer, x, activation):
    """``layer`` (a 1x1 Conv2D of a vector, or a Dense) as a Dense layer on ``x`` with the
    same name and weights and ``activation``."""
    weights = layer.get_weights()
    weights[0] = weights[0].reshape(weights[0].shape[-2], weights[0].shape[-1])
    dense = keras.layers.Dense(int(weights[0].shape[-1]), activation=activation,
                               use_bias=layer.use_bias, name=layer.name)
    y = dense(x)
    dense.set_weights(weights)
    return y


def logits_model(model: keras.Model, name: str | None = None) -> keras.Model:
    """`training_form` of ``model`` without its softmax: the model that outputs the logits
    (the same variables as the training form; ``model`` itself when it outputs logits and is
    in training form). Example::

        logits = logits_model(model)
        probabilities = tf.nn.softmax(logits(x))   # model(x) when the model has a softmax
    """
    trainable = training_form(model)
    head = find_classifier(trainable)
    if head.outputs_logits:
        return trainable
    drop = head.softmax

    def call_layer(layer, args, kwargs):
        if layer.name == drop:
            return args[0]
        return layer(*args, **kwargs)

    return rebuild(trainable, call_layer, name=name or trainable.name)


def with_new_classifier(model: keras.Model, classes: int, seed: int = 0,
                        name: str | None = None) -> keras.Model:
    """An independent copy of ``model`` (in `training_form`) whose classifier is a new Dense
    layer of ``classes`` outputs (same name, Glorot-uniform initialised from ``seed``, zero
    bias); every other layer keeps its weights, a softmax after the classifier stays. Use it
    to put the target task's head on a backbone pruned under its ImageNet classifier::

        task = with_new_classifier(imagenet_model, classes=10, seed=0)
        task.output_shape      # (None, 10)
    """
    if int(classes) < 1:
        raise ValueError(f"with_new_classifier: classes must be positive, got {classes}")
    source = training_form(model)
    head = find_classifier(source).layer

    def call_layer(layer, args, kwargs):
        if layer is head:
            return keras.layers.Dense(
                int(classes), use_bias=True, name=layer.name,
                kernel_initializer=keras.initializers.GlorotUniform(seed=int(seed)))(args[0])
        return layer(*args, **kwargs)

    return copy_model(rebuild(source, call_layer, name=name or model.name))
