"""How important each input channel of a weight-updated layer is (for channel selection).

Small serialisable objects (``get_config``) computing TensorFlow scores, so a selection
callback can evaluate every layer inside one compiled function; `get_importance` builds one
from a name::

    from dgst_tf.training.channel_importance import get_importance
    scores = get_importance("weight_l2").scores(kernel, state, step, layer_index)

- ``weight_l2``: L2 norm of the channel's weights ``W[:, :, c, :]`` (Lin et al.'s criterion);
  on the int8 training graph the selection callback uses its integer form
  `int8_channel_scores` instead, the device's score bit for bit;
- ``grad_norm``: the channel's weight-gradient norm when it was last updated; channels not
  yet visited score the largest norm seen so far (optimistic, so they get tried);
- ``random``: seeded uniform scores, new every step (stateless: a function of seed, step
  and layer, so a resumed run draws the same numbers).

`IMPORTANCE` is the registry `get_importance` reads (name -> class); a new criterion is a
`ChannelImportance` subclass with a ``name`` added to it. These score channels for the sparse
update; the pruning package's importances score channel groups to remove and are separate.
"""
from dgst_tf.core.keras_compat import tf


def channel_axis(kernel) -> int:
    """Axis of the input channels: 0 for a Dense kernel, 2 for (depthwise) conv kernels."""
    return 0 if len(kernel.shape) == 2 else 2


class ChannelImportance:
    """Base class: ``scores`` returns a float32 vector with one score per input channel.

    ``seeded``: the constructor takes a ``seed`` (`get_importance` passes its own).
    """

    name = "base"
    seeded = False

    def scores(self, kernel, state: dict, step, layer_index: int):
        raise NotImplementedError

    def get_config(self) -> dict:
        return {"name": self.name}


class WeightL2(ChannelImportance):
    """L2 norm of each input channel's weights (Lin et al. 2022's criterion)."""

    name = "weight_l2"

    def scores(self, kernel, state, step, layer_index):
        axis = channel_axis(kernel)
        others = [a for a in range(len(kernel.shape)) if a != axis]
        return tf.sqrt(tf.reduce_sum(tf.square(tf.convert_to_tensor(kernel)), axis=others))


class GradientNormEstimate(ChannelImportance):
    """Each channel's last recorded weight-gradient norm; unvisited channels score the best."""

    name = "grad_norm"

    def scores(self, kernel, state, step, layer_index):
        norms, seen = tf.convert_to_tensor(state["grad_norm"]), tf.convert_to_tensor(
            state["visited"])
        best = tf.reduce_max(tf.where(seen, norms, tf.zeros_like(norms)))
        optimistic = tf.where(tf.reduce_any(seen), best, tf.ones_like(best))
        return tf.where(seen, norms, optimistic)


class RandomImportance(ChannelImportance):
    """Seeded uniform scores, new every step (for channel selection; not pruning's scorer)."""

    name = "random"
    seeded = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def scores(self, kernel, state, step, layer_index):
        channels = state["visited"].shape[0]
        seed = tf.stack([tf.cast(self.seed, tf.int64) * 1_000_003 + layer_index,
                         tf.cast(step, tf.int64)])
        return tf.random.stateless_uniform([channels], seed=seed)

    def get_config(self):
        return {"name": self.name, "seed": self.seed}


# The registry: criterion name -> class.
IMPORTANCE = {
    WeightL2.name: WeightL2,
    GradientNormEstimate.name: GradientNormEstimate,
    RandomImportance.name: RandomImportance,
}


def get_importance(spec, seed: int = 0) -> ChannelImportance:
    """A ChannelImportance from an instance, a name in IMPORTANCE, or a config dict
    (``get_config``'s); ``seed`` seeds the seeded ones unless the config names a seed.

        get_importance("random", seed=3).get_config()     # {"name": "random", "seed": 3}
    """
    if isinstance(spec, ChannelImportance):
        return spec
    config = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = config.pop("name", None)
    if name not in IMPORTANCE:
        raise ValueError(f"unknown channel importance {name!r}; choose from {sorted(IMPORTANCE)}"
                         " or pass a ChannelImportance")
    cls = IMPORTANCE[name]
    if cls.seeded:
        config.setdefault("seed", seed)
    return cls(**config)


def int8_channel_scores(kernel, multipliers, depthwise: bool = False):
    """int64 [C]: DGSU's integer importance of int8-valued weights, bit-identical to the
    device (``DGST_SELECT_CHANNELS``) and to `dgst_tf.tflm_ops.reference.channel_scores`:
    ``score[c] = sum_o m[o] * sum_t w[t, c, o]^2`` (depthwise: ``m[c] * sum_t w[t, c]^2``),
    ``w`` the kernel rounded to integers and clipped to [-127, 127], ``m`` the int32
    `reference.score_multipliers` of the weight scales (per output channel; depthwise: per
    channel x multiplier, in the kernel's order).

        int8_channel_scores(layer.kernel, score_multipliers(graph.weight_scales["dw"]), True)
    """
    kernel = tf.convert_to_tensor(kernel)
    q = tf.cast(tf.clip_by_value(tf.round(kernel), -127.0, 127.0), tf.int64)
    squares = q * q
    if len(kernel.shape) == 4:
        squares = tf.reduce_sum(squares, axis=[0, 1])  # [C, c_out] (depthwise [C, M])
    m = tf.constant(multipliers, tf.int64)
    m = tf.reshape(m, squares.shape if depthwise else (1, squares.shape[-1]))
    return tf.reduce_sum(squares * m, axis=1)


def top_k_channels(scores, k: int, preferred=None):
    """Sorted indices of the k best channels; ``preferred`` channels (bool) rank first.

    Exact lexicographic ranking (no float arithmetic on the scores): preferred first, then
    by score descending, ties to the lower channel index, so the choice is deterministic and
    integer scores (`int8_channel_scores`) rank exactly as on the device.

        top_k_channels(tf.constant([0.1, 0.9, 0.5, 0.9]), 2)        # [1, 3]

    This is the Keras simulation of the device's selection. The chain Keras simulation ->
    NumPy reference (`dgst_tf.tflm_ops.reference.select_ranked`) -> C kernels is
    intentional: the NumPy reference is the single oracle the C kernels are checked against,
    and this TensorFlow version runs inside the compiled train step.
    """
    order = tf.argsort(tf.convert_to_tensor(scores), direction="DESCENDING", stable=True)
    if preferred is not None:
        group = tf.gather(tf.cast(preferred, tf.int32), order)
        order = tf.gather(order, tf.argsort(group, direction="DESCENDING", stable=True))
    return tf.sort(order[:k])
