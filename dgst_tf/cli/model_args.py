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
    from dgst_tf.core.keras_compat import keras

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


def add_model_arguments(parser, width: float = 0.35, image_size: int = 128):
    """Add the "model" argument group that `model_from_args` reads (``--model --width
    --image-size --classes --weights``); returns the group so a command can add to it.

        model = add_model_arguments(sub.add_parser("plan"), width=0.35, image_size=128)
    """
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="mobilenet_v2",
                       help="mobilenet_v2 (built here) or a saved tf-keras model (.keras/.h5)")
    model.add_argument("--width", type=float, default=width)
    model.add_argument("--image-size", type=int, default=image_size)
    model.add_argument("--classes", type=int, default=10,
                       help="classifier outputs (when no dataset gives them)")
    model.add_argument("--weights", default="auto",
                       help="auto (imagenet for width 1.0 if installed, else none), imagenet, "
                            "none, or a .pth/.npz path")
    return model
