"""How much an attack recovered: PSNR and SSIM (scikit-image) and the label recovery rate.

    from dgst_tf.federated.leakage.metrics import psnr, ssim, label_recovery_rate
    psnr(original, found.image), ssim(original, found.image)   # (H, W, C) in [0, 1]
    label_recovery_rate(true_labels, found_labels)

PSNR in dB with data range 1 (identical images: infinity); SSIM (Wang et al. 2004) over the
colour channels with scikit-image's default 7x7 window (images need both sides >= 7).
"""
from __future__ import annotations

import numpy as np


def _pair(original, reconstruction) -> tuple[np.ndarray, np.ndarray]:
    original = np.asarray(original, np.float64)
    reconstruction = np.asarray(reconstruction, np.float64)
    if original.shape != reconstruction.shape or original.ndim != 3:
        raise ValueError(f"need two (H, W, C) images of one shape, got {original.shape} "
                         f"and {reconstruction.shape}")
    for name, image in (("original", original), ("reconstruction", reconstruction)):
        if image.min() < 0 or image.max() > 1:
            raise ValueError(f"{name} has values in [{image.min():.3g}, {image.max():.3g}]; "
                             "metrics need pixels in [0, 1]")
    return original, reconstruction


def psnr(original, reconstruction) -> float:
    """Peak signal-to-noise ratio in dB, pixels in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio

    original, reconstruction = _pair(original, reconstruction)
    if np.array_equal(original, reconstruction):
        return float("inf")
    return float(peak_signal_noise_ratio(original, reconstruction, data_range=1.0))


def ssim(original, reconstruction) -> float:
    """Structural similarity over the colour channels, pixels in [0, 1]."""
    from skimage.metrics import structural_similarity

    original, reconstruction = _pair(original, reconstruction)
    return float(structural_similarity(original, reconstruction, data_range=1.0,
                                       channel_axis=-1))


def label_recovery_rate(true_labels, found_labels) -> float:
    """The fraction of images whose label the attack found."""
    true_labels, found_labels = np.ravel(true_labels), np.ravel(found_labels)
    if true_labels.shape != found_labels.shape or not true_labels.size:
        raise ValueError(f"need as many found labels as true ones (>0), got "
                         f"{found_labels.size} and {true_labels.size}")
    return float(np.mean(true_labels == found_labels))
