"""Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network"): train a student to match a teacher's temperature-softened outputs.

DGSU's pipeline (Li & Chang 2024) prunes the ImageNet model before it reaches the device;
without ImageNet images the pruned model recovers by matching the unpruned ImageNet model's
outputs on the target images, no labels needed::

    from dgst_tf.training.distillation import Distiller

    distiller = Distiller(student=pruned, teacher=imagenet_model, temperature=4.0)
    distiller.compile(optimizer=keras.optimizers.SGD(0.003, momentum=0.9))
    distiller.fit(target_images_dataset, epochs=1)   # (x,) or (x, y): labels are ignored
    pruned  # trained in place

With ``label_weight > 0`` and labels in the data, the loss is
``(1 - label_weight) * T^2 * KL(p_teacher^T || p_student^T) + label_weight * CE(y, student)``
(the ``T^2`` keeps the soft term's gradients at the scale of the hard one's).
"""
from __future__ import annotations

from dgst_tf.core.keras_compat import keras, tf

__all__ = ["Distiller", "distillation_loss"]


def distillation_loss(teacher_logits, student_logits, temperature: float):
    """Mean over the batch of ``T^2 * KL(softmax(t / T) || softmax(s / T))``.

        distillation_loss(tf.constant([[2.0, 0.0]]), tf.constant([[2.0, 0.0]]), 4.0)  # 0.0
    """
    t = float(temperature)
    teacher = tf.nn.softmax(tf.cast(teacher_logits, tf.float32) / t)
    log_student = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / t)
    log_teacher = tf.math.log(tf.maximum(teacher, 1e-12))
    return t * t * tf.reduce_mean(tf.reduce_sum(teacher * (log_teacher - log_student), -1))


class Distiller(keras.Model):
    """``student`` trained on ``distillation_loss`` against the frozen ``teacher``.

    Both must output logits of the same width. ``call`` is the student's, so callbacks that
    look for wrapped layers (TF-MOT's ``UpdatePruningStep``) find the student's. Logs
    ``distillation`` (the soft loss), ``loss`` and ``agreement`` (fraction of images where the
    student's top-1 class is the teacher's).
    """

    def __init__(self, student: keras.Model, teacher: keras.Model, temperature: float = 4.0,
                 label_weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if float(temperature) <= 0:
            raise ValueError(f"Distiller: temperature must be > 0, got {temperature}")
        if not 0.0 <= float(label_weight) <= 1.0:
            raise ValueError(f"Distiller: label_weight must be in [0, 1], got {label_weight}")
        student_width, teacher_width = student.output_shape[-1], teacher.output_shape[-1]
        if student_width != teacher_width:
            raise ValueError(f"Distiller: student {student.name!r} has {student_width} "
                             f"outputs, teacher {teacher.name!r} has {teacher_width}")
        self.student, self.teacher = student, teacher
        self.teacher.trainable = False
        self.temperature, self.label_weight = float(temperature), float(label_weight)
        self.label_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._means = {name: keras.metrics.Mean(name)
                       for name in ("loss", "distillation", "agreement")}

    @property
    def metrics(self):
        return list(self._means.values())  # reset by fit/evaluate at every epoch

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def _loss_terms(self, x, y, training: bool):
        teacher = self.teacher(x, training=False)
        student = self.student(x, training=training)
        soft = distillation_loss(teacher, student, self.temperature)
        loss = soft
        if y is not None and self.label_weight > 0:
            loss = (1 - self.label_weight) * soft + self.label_weight * self.label_loss(
                y, student)
        if self.student.losses:  # regularizers of the student
            loss = loss + tf.add_n(self.student.losses)
        agree = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(student, -1),
                                                tf.argmax(teacher, -1)), tf.float32))
        return loss, {"loss": loss, "distillation": soft, "agreement": agree}

    def _logged(self, values: dict) -> dict:
        for name, value in values.items():
            self._means[name].update_state(value)
        return {name: mean.result() for name, mean in self._means.items()}

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, values = self._loss_terms(x, y, training=True)
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return self._logged(values)

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self._logged(self._loss_terms(x, y, training=False)[1])
