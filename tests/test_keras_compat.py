import subprocess
import sys

import pytest

from dgst_tf.core.keras_compat import Keras3ModelError, keras, require_keras2


def test_tf_keras_model_is_accepted():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert require_keras2(model, "test") is model


def test_keras3_model_is_rejected_with_the_fix():
    import keras as keras3  # Keras 3, what tf.keras is by default in TF 2.21

    model = keras3.Sequential([keras3.Input((3,)), keras3.layers.Dense(2)])
    with pytest.raises(Keras3ModelError) as info:
        require_keras2(model, "dgst_tf.some_function")
    message = str(info.value)
    assert "dgst_tf.some_function" in message
    assert "import tf_keras" in message and "TF_USE_LEGACY_KERAS=1" in message


def test_non_model_is_rejected():
    with pytest.raises(TypeError, match="expected a tf_keras Model"):
        require_keras2(object(), "f")


def test_exporter_package_maps_to_top_level_export_folder():
    import pathlib

    import dgst_tf.export

    root = pathlib.Path(__file__).resolve().parents[1]
    assert pathlib.Path(dgst_tf.export.__file__).resolve().parent == root / "export"


def test_import_from_repository_root_with_python_m():
    # `python -m pytest` from the root puts the root on sys.path before site-packages.
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", "import dgst_tf.export, dgst_tf; "
                          "print(dgst_tf.__version__)"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
