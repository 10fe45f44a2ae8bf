"""Knowledge distillation: the loss against a NumPy formula, a student pulled toward its
teacher without labels, and pruning recovery by distillation."""
import numpy as np
import pytest

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.pruning import prune_while_training
from dgst_tf.training.distillation import Distiller, distillation_loss

from small_models import batch, residual_cnn


def _numpy_kd(teacher, student, t):
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher / t), softmax(student / t)
    return t * t * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))


def test_distillation_loss_is_temperature_scaled_kl():
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(0, 3, (5, 7)), rng.normal(0, 3, (5, 7))
    for t in (1.0, 4.0):
        got = float(distillation_loss(tf.constant(teacher, tf.float32),
                                      tf.constant(student, tf.float32), t))
        np.testing.assert_allclose(got, _numpy_kd(teacher, student, t), rtol=1e-5)
    assert float(distillation_loss(tf.constant(teacher), tf.constant(teacher), 4.0)) == \
        pytest.approx(0.0, abs=1e-6)


def _perturbed_copy(model, seed, noise=0.3):
    copy = keras.models.clone_model(model)
    rng = np.random.default_rng(seed)
    copy.set_weights([w + rng.normal(0, noise, w.shape).astype(w.dtype) * (np.std(w) + 1e-3)
                      for w in model.get_weights()])
    return copy


def test_distiller_pulls_the_student_to_the_teacher_without_labels():
    teacher = residual_cnn(seed=0)
    student = residual_cnn(seed=7)  # another initialization
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    x, _ = batch(32)
    images = tf.data.Dataset.from_tensor_slices(x).batch(8)  # no labels
    distiller = Distiller(student, teacher, temperature=2.0)
    distiller.compile(optimizer=keras.optimizers.Adam(0.003))
    before = distiller.evaluate(images, verbose=0, return_dict=True)
    history = distiller.fit(images, epochs=15, verbose=0).history
    after = distiller.evaluate(images, verbose=0, return_dict=True)
    assert after["distillation"] < 0.5 * before["distillation"], (before, after)
    assert history["distillation"][-1] < history["distillation"][0]
    assert after["agreement"] >= before["agreement"]
    for kept, now in zip(teacher_weights, teacher.get_weights()):
        np.testing.assert_array_equal(kept, now)  # the teacher is frozen
    np.testing.assert_allclose(distiller(x).numpy(), student(x).numpy())


def test_distiller_refuses_mismatched_outputs_and_bad_settings():
    teacher = residual_cnn()
    student = residual_cnn(classes=3)
    with pytest.raises(ValueError, match="outputs"):
        Distiller(student, teacher)
    with pytest.raises(ValueError, match="temperature"):
        Distiller(_perturbed_copy(teacher, 0), teacher, temperature=0.0)
    with pytest.raises(ValueError, match="label_weight"):
        Distiller(_perturbed_copy(teacher, 0), teacher, label_weight=2.0)


def test_pruning_recovers_by_distillation_from_the_unpruned_model():
    model = residual_cnn()
    teacher = keras.models.clone_model(model)
    teacher.set_weights(model.get_weights())
    x, _ = batch(16)
    images = tf.data.Dataset.from_tensor_slices(x).batch(4)
    result = prune_while_training(model, images, 0.5, epochs=3, updates=2, teacher=teacher,
                                  temperature=2.0,
                                  optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    assert set(result.family_sparsity.values()) == {0.5}
    assert {"distillation", "agreement"} <= set(result.history)
    np.testing.assert_allclose(result.model(x, training=False).numpy(),
                               result.masked_model(x, training=False).numpy(), atol=1e-5)
    assert result.model.count_params() < teacher.count_params()
