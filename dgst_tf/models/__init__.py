"""Pretrained models: torchvision's MobileNetV2 in tf-keras, offline ImageNet weights.

    from dgst_tf.models import mobilenet_v2, preprocess_input, IMAGENET_CAT_CLASSES
    model = mobilenet_v2()                                   # width 1.0, ImageNet
    top1 = int(model(preprocess_input(images)).numpy().argmax(-1)[0])
    top1 in IMAGENET_CAT_CLASSES                             # for a photo of a cat
"""
from dgst_tf.models.mobilenet_v2 import (
    TF_PREPROCESSING,
    TORCH_PREPROCESSING,
    imagenet_weights_available,
    mobilenet_v2,
    preprocess,
    preprocess_input,
    preprocessing_for,
)
from dgst_tf.models.model_file import save_model_atomically
from dgst_tf.models.torch_checkpoint import load_state_dict

__all__ = [
    "mobilenet_v2",
    "preprocess_input",
    "preprocess",
    "preprocessing_for",
    "TORCH_PREPROCESSING",
    "TF_PREPROCESSING",
    "load_state_dict",
    "save_model_atomically",
    "imagenet_weights_available",
    "IMAGENET_CLASS_NAMES",
    "IMAGENET_CAT_CLASSES",
    "imagenet_class_name",
    "imagenet_class_id",
]

# A few ImageNet-1k class ids (index into the 1000 logits), enough for sanity checks.
IMAGENET_CLASS_NAMES = {
    281: "tabby",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
    665: "moped",
    967: "espresso",
}
IMAGENET_CAT_CLASSES = range(281, 286)  # the domestic cats: tabby .. Egyptian cat


def imagenet_class_name(class_id: int) -> str:
    """Name of a known ImageNet class id: ``imagenet_class_name(967) == "espresso"``."""
    try:
        return IMAGENET_CLASS_NAMES[int(class_id)]
    except KeyError:
        raise KeyError(f"ImageNet class {class_id} is not in IMAGENET_CLASS_NAMES "
                       f"(only a few classes are listed)") from None


def imagenet_class_id(name: str) -> int:
    """Id of a known ImageNet class name: ``imagenet_class_id("espresso") == 967``."""
    for class_id, class_name in IMAGENET_CLASS_NAMES.items():
        if class_name.lower() == name.lower():
            return class_id
    raise KeyError(f"ImageNet class {name!r} is not in IMAGENET_CLASS_NAMES "
                   f"(known: {sorted(IMAGENET_CLASS_NAMES.values())})")
