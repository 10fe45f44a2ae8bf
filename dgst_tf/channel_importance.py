"""How important each input channel of a weight-updated layer is (for channel selection).

Small serialisable objects (``get_config``); `get_importance` builds one from a name::

    from dgst_tf.channel_importance import get_importance
    scores = get_importance("weight_l2").scores(layer, state, step=0)   # shape [channels]

- ``weight_l2``: L2 norm of the channel's weights ``W[:, :, c, :]`` (Lin et al.'s criterion);
- ``grad_norm``: the channel's weight-gradient norm when it was last updated; channels not
  yet visited score the largest norm seen so far (optimistic, so they get tried);
- ``random``: seeded uniform scores, new every step.
"""
import numpy as np

from dgst_tf.scheme import kernel_of


class ChannelImportance:
    name = "base"

    def scores(self, layer, state: dict, step: int) -> np.ndarray:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {"name": self.name}


class WeightL2(ChannelImportance):
    name = "weight_l2"

    def scores(self, layer, state, step):
        kernel = kernel_of(layer).numpy()
        axis = 0 if kernel.ndim == 2 else 2
        moved = np.moveaxis(kernel, axis, 0).reshape(kernel.shape[axis], -1)
        return np.sqrt((moved.astype(np.float64) ** 2).sum(axis=1))


class GradientNormEstimate(ChannelImportance):
    name = "grad_norm"

    def scores(self, layer, state, step):
        norms = state["grad_norm"].astype(np.float64)
        seen = state["visited"]
        optimistic = norms[seen].max() if seen.any() else 1.0
        return np.where(seen, norms, optimistic)


class RandomImportance(ChannelImportance):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def scores(self, layer, state, step):
        salt = sum(layer.name.encode())
        return np.random.default_rng([self.seed, step, salt]).random(len(state["visited"]))

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


def top_k(scores: np.ndarray, k: int, tie_break_seed) -> np.ndarray:
    """Indices of the k largest scores; ties broken by a seeded permutation."""
    order = np.random.default_rng(tie_break_seed).permutation(len(scores))
    ranked = order[np.argsort(-scores[order], kind="stable")]
    return ranked[:k]
