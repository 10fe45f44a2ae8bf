"""The one place that decides which Keras dgst-tf uses: tf-keras (Keras 2).

TF-MOT only accepts tf-keras objects, and TensorFlow 2.21's ``tf.keras`` is Keras 3.
Every module of the package imports Keras from here::

    from dgst_tf.core.keras_compat import keras, require_keras2

    model = keras.Sequential([keras.layers.Dense(2)])
    require_keras2(model, "my_function")   # raises Keras3ModelError for Keras 3 models
"""
# dgst_tf/__init__.py sets TF_USE_LEGACY_KERAS before this first import of TensorFlow.
import tensorflow as tf
import tf_keras as keras

__all__ = ["keras", "tf", "Keras3ModelError", "require_keras2"]

KERAS3_FIX = (
    "dgst-tf needs tf-keras (Keras 2) objects, because TensorFlow Model Optimization only "
    "works with them. Build the model with `import tf_keras as keras` (instead of "
    "`import keras` / `tf.keras`), or set the environment variable TF_USE_LEGACY_KERAS=1 "
    "before TensorFlow is first imported."
)


class Keras3ModelError(TypeError):
    """A Keras 3 object was passed where a tf-keras (Keras 2) object is required."""


def _is_keras3(obj) -> bool:
    module = type(obj).__module__ or ""
    return module == "keras" or module.startswith("keras.") or module.startswith("keras.src")


def require_keras2(obj, where: str, kind=None):
    """Check that ``obj`` is a tf-keras object (a ``keras.Model`` unless ``kind`` is given).

    Raises ``Keras3ModelError`` naming ``where`` and the fix for Keras 3 objects, and
    ``TypeError`` for anything else. Returns ``obj`` so it can be used inline.
    """
    kind = kind or keras.Model
    if isinstance(obj, kind):
        return obj
    if _is_keras3(obj):
        raise Keras3ModelError(
            f"{where}: got a Keras 3 object ({type(obj).__module__}.{type(obj).__name__}). "
            + KERAS3_FIX
        )
    raise TypeError(
        f"{where}: expected a tf_keras {kind.__name__}, got {type(obj).__module__}."
        f"{type(obj).__name__}."
    )
