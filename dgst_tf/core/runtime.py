"""Process-wide settings: TensorFlow threads, seeds and the cache directory.

    from dgst_tf.core import runtime
    runtime.limit_threads(2)
    runtime.seed_everything(0)
    path = runtime.cache_dir("weights")
"""
import os
import pathlib
import random

import numpy as np

from dgst_tf.core.keras_compat import keras, tf


def limit_threads(n: int | None = None) -> int:
    """Limit TensorFlow's intra- and inter-op threads to ``n`` (default: the usable cores).

    Must run before TensorFlow executes its first op; later calls are ignored.
    """
    n = n or len(os.sched_getaffinity(0))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(min(n, 2))
    except RuntimeError:  # TensorFlow already initialised its thread pools
        pass
    return n


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.random.set_seed(seed)


def cache_dir(*parts: str) -> pathlib.Path:
    """A folder under the user cache (``$DGST_CACHE_DIR`` or ``$XDG_CACHE_HOME/dgst-tf``)."""
    root = os.environ.get("DGST_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "dgst-tf")
    path = pathlib.Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
