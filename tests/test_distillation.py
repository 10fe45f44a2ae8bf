"""Knowledge distillation: the loss against a NumPy formula, a student pulled toward its
teacher without labels, pruning recovery by distillation, and the device pipeline's pruning
under the pretrained model's own classifier before the task's classifier is attached."""
import numpy as np
import pytest

from dgst_tf import models
from dgst_tf.core.classifier import with_new_classifier
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.jobs.device_prune import prune_to_flash
from dgst_tf.pruning import prune_while_training
from dgst_tf.pruning.model_size import deployable_size
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


def _backbone_weights(model):
    return [w for layer in model.layers if layer.name != "classifier"
            for w in layer.get_weights()]


def test_with_new_classifier_keeps_the_backbone_and_seeds_a_new_head():
    model = models.mobilenet_v2(0.25, (32, 32, 3), classes=7, weights=None, seed=0)
    task = with_new_classifier(model, 3, seed=5)
    assert task.output_shape == (None, 3) and task.get_layer("classifier").units == 3
    for ours, theirs in zip(_backbone_weights(task), _backbone_weights(model)):
        np.testing.assert_array_equal(ours, theirs)
    kernel, bias = task.get_layer("classifier").get_weights()
    np.testing.assert_array_equal(
        kernel, keras.initializers.GlorotUniform(seed=5)(kernel.shape).numpy())
    assert not bias.any()
    # its own variables: training the copy leaves the original alone
    task.get_layer("stem_conv").kernel.assign_add(tf.ones_like(task.get_layer("stem_conv").kernel))
    assert not np.array_equal(task.get_layer("stem_conv").get_weights()[0],
                              model.get_layer("stem_conv").get_weights()[0])
    with pytest.raises(ValueError, match="classes must be positive, got 0"):
        with_new_classifier(model, 0)


def test_prune_to_flash_distils_under_the_teachers_classifier_then_attaches_the_task_head():
    teacher = models.mobilenet_v2(0.25, (32, 32, 3), classes=7, weights=None, seed=0)
    task = with_new_classifier(teacher, 3, seed=9)
    x = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    y = np.arange(16) % 3
    unpruned = deployable_size(task).total
    pruned, record = prune_to_flash(
        task, x, y, flash_budget=int(0.8 * unpruned) + 1000, allowance=1000,
        deployable_bytes=lambda m: deployable_size(m).total, batch_size=8, seed=2,
        teacher=teacher)
    assert record["pruned"] and record["teacher_classes"] == 7
    assert record["deployable_bytes"] <= int(0.8 * unpruned)
    assert {"distillation", "agreement"} <= set(record["history"])
    # the deployed model has the task's classifier, newly initialised from the seed, on a
    # backbone pruned under the teacher's 7-way classifier
    assert pruned.output_shape == (None, 3)
    kernel = pruned.get_layer("classifier").get_weights()[0]
    assert kernel.shape[0] < teacher.get_layer("classifier").get_weights()[0].shape[0]
    np.testing.assert_array_equal(
        kernel, keras.initializers.GlorotUniform(seed=2)(kernel.shape).numpy())
