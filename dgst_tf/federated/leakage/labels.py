"""iDLG's label recovery (Zhao et al. 2020): the label from the signs of the classifier's
gradient, at batch size 1, without any optimisation.

    from dgst_tf.federated.leakage.labels import label_from_classifier, recover_label
    label = recover_label(model, seen)             # from an observation
    label = label_from_classifier(kernel_grad, bias_grad)

With logits z = W h + b and the cross-entropy of softmax(z), dL/db_j = p_j - [j = y]: the
true class is the only negative entry. dL/dW[:, j] = h (p_j - [j = y]) has, for inputs h >= 0
(the pooled ReLU6 features of MobileNetV2), the same sign pattern, so the column with the
smallest sum is the label. The bias gradient is used when sent, else the kernel's.
"""
from __future__ import annotations

import numpy as np

from dgst_tf.training.scheme import classifier_layer


def label_from_classifier(kernel_gradient=None, bias_gradient=None) -> int:
    """The label whose classifier gradient is the most negative (module doc).

        label_from_classifier(bias_gradient=[0.1, -0.7, 0.6])     # 1
    """
    if bias_gradient is not None:
        return int(np.argmin(np.asarray(bias_gradient).ravel()))
    if kernel_gradient is None:
        raise ValueError("label recovery needs the classifier's kernel or bias gradient")
    kernel_gradient = np.asarray(kernel_gradient)
    if kernel_gradient.ndim != 2:
        raise ValueError(f"a Dense kernel gradient is (inputs, classes), got shape "
                         f"{kernel_gradient.shape}")
    return int(np.argmin(kernel_gradient.sum(axis=0)))


def classifier_indices(model) -> tuple[int, int | None]:
    """Indices of the classifier's kernel and bias (None without bias) in
    ``model.trainable_weights``, the federation's weight list."""
    layer = classifier_layer(model)
    refs = [v.ref() for v in model.trainable_weights]
    if layer.kernel.ref() not in refs:
        raise ValueError(f"classifier {layer.name!r}: its kernel is not trainable")
    bias = None
    if layer.use_bias and layer.bias.ref() in refs:
        bias = refs.index(layer.bias.ref())
    return refs.index(layer.kernel.ref()), bias


def recover_label(model, observation) -> int:
    """The label of an observation's image from its classifier gradient (module doc);
    ValueError if the update does not contain the classifier."""
    kernel, bias = classifier_indices(model)
    if bias is not None and observation.sent[bias].all():
        return label_from_classifier(bias_gradient=observation.gradients[bias])
    if observation.sent[kernel].all():
        return label_from_classifier(kernel_gradient=observation.gradients[kernel])
    raise ValueError(f"observation {observation.scenario!r} does not contain the whole "
                     f"classifier {classifier_layer(model).name!r}: no label to recover")
