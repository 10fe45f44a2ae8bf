"""The model a `dgst` command names, defined once for every command: ``--model mobilenet_v2``
(built here, ``--width``, ``--image-size``, ``--weights``) or a saved tf-keras model file
(``--model path.keras|.h5``, checked by `dgst_tf.models.own_model.load_own_model` before
the command writes anything).

    model = add_model_arguments(parser, width=0.35, image_size=128)   # the argument group
    resolve_image_size(args)            # --image-size, else a model file's, else the default
    model, description = model_from_args(args)              # args from argparse
    model, _ = model_from_args(args, classes=10)             # the dataset's classes
"""
from __future__ import annotations

WEIGHTS_HELP = ("auto (imagenet for width 1.0 if installed, else none), imagenet, none, or a "
                ".pth/.npz path")
MODEL_HELP = ("mobilenet_v2 (built here from --width and --weights) or a saved tf-keras "
              "model (.keras / .h5) whose input is --image-size x --image-size x 3; its "
              "classifier may be a Dense layer or a 1x1 Conv2D of the pooled map, with or "
              "without a softmax")


def model_from_args(args, classes: int | None = None):
    """(tf-keras model, a one-line description) for the command's model arguments.

    A model file is loaded and checked (`load_own_model`: input ``--image-size``, every
    layer supported, a trainable classifier with ``classes`` outputs when given).
    ``--weights auto`` means the offline ImageNet checkpoint for width 1.0 (when installed)
    and random init otherwise; ``none`` is random init.
    """
    from dgst_tf import models
    from dgst_tf.models.own_model import is_model_file, load_own_model

    if is_model_file(args.model):
        model = load_own_model(args.model, args.image_size, classes)
        args.image_size = int(model.inputs[0].shape[1])
        return model, args.model
    resolve_image_size(args)
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


def add_model_arguments(parser, width: float = 0.35, image_size: int = 128, *,
                        weights: str | None = "auto", weights_help: str = WEIGHTS_HELP,
                        classes: bool = True):
    """Add the "model" argument group that `model_from_args` reads (``--model --width
    --image-size --weights``, and ``--classes`` unless ``classes=False``: commands whose
    dataset gives the classes); returns the group so a command can add to it.

        model = add_model_arguments(sub.add_parser("plan"), width=0.35, image_size=128)
        add_model_arguments(train, width=1.0, image_size=96, weights="imagenet",
                            classes=False)
    """
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="mobilenet_v2", help=MODEL_HELP)
    model.add_argument("--width", type=float, default=width,
                       help="MobileNetV2 width multiplier (--model mobilenet_v2)")
    model.add_argument("--image-size", type=int, default=None,
                       help=f"images are resized to this square size (default {image_size}; "
                            "with a model file its input size, which --image-size must "
                            "match)")
    parser.set_defaults(default_image_size=image_size)
    if classes:
        model.add_argument("--classes", type=int, default=10,
                           help="classifier outputs (when no dataset gives them)")
    model.add_argument("--weights", default=weights,
                       help=weights_help + " (a model file brings its own weights; where "
                       "images are preprocessed, keras-imagenet then means x/127.5 - 1, "
                       "anything else torchvision's normalisation)")
    return model


def resolve_image_size(args) -> int:
    """``--image-size`` when given, else a model file's input size (the file is loaded and
    checked: `load_own_model`), else the command's default; stored in ``args.image_size``."""
    from dgst_tf.models.own_model import is_model_file, load_own_model

    if args.image_size is None:
        if is_model_file(args.model):
            shape = load_own_model(args.model).inputs[0].shape
            if shape[1] != shape[2]:
                raise ValueError(f"--model {args.model!r}: input {shape[1]}x{shape[2]}: "
                                 "dgst-tf's datasets give square images")
            args.image_size = int(shape[1])
        else:
            args.image_size = args.default_image_size
    return args.image_size


def model_settings(args) -> dict:
    """The model fields of a job's config from parsed arguments (``model``, ``width``,
    ``image_size`` (`resolve_image_size`), ``weights``; ``"none"`` weights are None)."""
    resolve_image_size(args)
    return {"model": args.model, "width": args.width, "image_size": args.image_size,
            "weights": None if args.weights == "none" else args.weights}


MODEL_FIELDS = ("model", "width", "image_size", "weights")  # what add_model_arguments defines

__all__ = ["MODEL_FIELDS", "MODEL_HELP", "WEIGHTS_HELP", "add_model_arguments",
           "model_from_args", "model_settings", "resolve_image_size"]
