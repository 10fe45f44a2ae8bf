"""The model a `dgst` command names: ``--model mobilenet_v2`` (built here, ``--width``,
``--image-size``, ``--weights``) or a saved tf-keras model file.

    model, description = model_from_args(args)              # args from argparse
    model, _ = model_from_args(args, classes=10)             # override --classes
"""
from __future__ import annotations

import os


def model_from_args(args, classes: int | None = None):
    """(tf-keras model, a one-line description) for the command's model arguments.

    ``--weights auto`` means the offline ImageNet checkpoint for width 1.0 (when installed)
    and random init otherwise; ``none`` is random init.
    """
    from dgst_tf import models
    from dgst_tf.keras_compat import keras

    if args.model != "mobilenet_v2":
        if not os.path.exists(args.model):
            raise ValueError(f"--model {args.model!r}: neither mobilenet_v2 nor a saved "
                             "model file")
        return keras.models.load_model(args.model, compile=False), args.model
    weights = args.weights
    if weights == "auto":
        weights = ("imagenet" if args.width == 1.0 and models.imagenet_weights_available()
                   else None)
    elif weights == "none":
        weights = None
    model = models.mobilenet_v2(args.width, (args.image_size, args.image_size, 3),
                                classes=args.classes if classes is None else classes,
                                weights=weights, seed=args.seed)
    return model, f"MobileNetV2-{args.width:g} ({weights or 'random init'})"
