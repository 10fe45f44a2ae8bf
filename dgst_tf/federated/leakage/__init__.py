"""Gradient leakage, measured: what a device's update gives back of its training image.

`what_is_sent` (the update a device sends after one batch-1 step, per scenario: dense,
last layer, Lin et al.'s static sparse update, DGSU, int8, clipped + noised), `privacy`
(the Gaussian mechanism and its epsilon), `matching` (the attacker's gradient-distance
objective), `labels` (iDLG's label from the classifier gradient), `attacks` (DLG, iDLG,
Inverting Gradients) and `metrics` (PSNR, SSIM, label recovery rate). Needs SciPy and
scikit-image (the ``test`` extra).

    from dgst_tf.federated.leakage import (SCENARIOS, GradientMatching, InvertingGradients,
                                           observe, psnr, recover_label)
    seen = observe(device, weights, image, label, SCENARIOS["dgsu"])
    matching = GradientMatching(device.sparse.base, seen, mean, std)
    found = InvertingGradients(matching).run(recover_label(device.sparse.base, seen))
    psnr(original_pixels, found.image)
"""
import importlib

_PUBLIC = {
    "SCENARIOS": "what_is_sent", "Scenario": "what_is_sent", "Observation": "what_is_sent",
    "observe": "what_is_sent",
    "gaussian_epsilon": "privacy", "noise_multiplier_for": "privacy",
    "clip_and_noise": "privacy",
    "GradientMatching": "matching",
    "recover_label": "labels", "label_from_classifier": "labels",
    "DLG": "attacks", "IDLG": "attacks", "InvertingGradients": "attacks",
    "psnr": "metrics", "ssim": "metrics", "label_recovery_rate": "metrics",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
