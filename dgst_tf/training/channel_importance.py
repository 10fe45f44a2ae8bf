"""How important each input channel of a weight-updated layer is (for channel selection).

Small serialisable objects (``get_config``) computing TensorFlow scores, so a selection
callback can evaluate every layer inside one compiled function; `get_importance` builds one
from a name::

    from dgst_tf.training.channel_importance import get_importance
    scores = get_importance("weight_l2").scores(kernel, state, step, layer_index)

- ``weight_l2``: L2 norm of the channel's weights ``W[:, :, c, :]`` (Lin et al.'s criterion);
- ``grad_norm``: the channel's weight-gradient norm when it was last updated; channels not
  yet visited score the largest norm seen so far (optimistic, so they get tried);
- ``random``: seeded uniform scores, new every step (stateless: a function of seed, step
  and layer, so a resumed run draws the same numbers).
"""
from dgst_tf.core.keras_compat import tf


def channel_axis(kernel) -> int:
    """Axis of the input channels: 0 for a Dense kernel, 2 for (depthwise) conv kernels."""
    return 0 if len(kernel.shape) == 2 else 2


class ChannelImportance:
    """Base class: ``scores`` returns a float32 vector with one score per input channel."""

    name = "base"

    def scores(self, kernel, state: dict, step, layer_index: int):
        raise NotImplementedError

    def get_config(self) -> dict:
        return {"name": self.name}


class WeightL2(ChannelImportance):
    name = "weight_l2"

    def scores(self, kernel, state, step, layer_index):
        axis = channel_axis(kernel)
        others = [a for a in range(len(kernel.shape)) if a != axis]
        return tf.sqrt(tf.reduce_sum(tf.square(tf.convert_to_tensor(kernel)), axis=others))


class GradientNormEstimate(ChannelImportance):
    name = "grad_norm"

    def scores(self, kernel, state, step, layer_index):
        norms, seen = tf.convert_to_tensor(state["grad_norm"]), tf.convert_to_tensor(
            state["visited"])
        best = tf.reduce_max(tf.where(seen, norms, tf.zeros_like(norms)))
        optimistic = tf.where(tf.reduce_any(seen), best, tf.ones_like(best))
        return tf.where(seen, norms, optimistic)


class RandomImportance(ChannelImportance):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def scores(self, kernel, state, step, layer_index):
        channels = state["visited"].shape[0]
        seed = tf.stack([tf.cast(self.seed, tf.int64) * 1_000_003 + layer_index,
                         tf.cast(step, tf.int64)])
        return tf.random.stateless_uniform([channels], seed=seed)

    def get_config(self):
        return {"name": self.name, "seed": self.seed}


IMPORTANCE = {cls.name: cls for cls in (WeightL2, GradientNormEstimate, RandomImportance)}


def get_importance(spec, seed: int = 0) -> ChannelImportance:
    """A ChannelImportance from an instance, a name in IMPORTANCE, or a config dict."""
    if isinstance(spec, ChannelImportance):
        return spec
    config = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = config.pop("name", None)
    if name not in IMPORTANCE:
        raise ValueError(f"unknown channel importance {name!r}; choose from {sorted(IMPORTANCE)}"
                         " or pass a ChannelImportance")
    if name == "random":
        config.setdefault("seed", seed)
    return IMPORTANCE[name](**config)


def top_k_channels(scores, k: int, preferred=None):
    """Sorted indices of the k best channels; ``preferred`` channels (bool) rank first.

    Ties go to the lower channel index (tf.math.top_k is stable), so the choice is
    deterministic.
    """
    scores = tf.cast(scores, tf.float32)
    if preferred is not None:
        lift = tf.reduce_max(scores) - tf.reduce_min(scores) + 1.0
        scores = scores + tf.cast(preferred, tf.float32) * lift
    return tf.sort(tf.math.top_k(scores, k=k).indices)
