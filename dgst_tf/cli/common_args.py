"""The flags several `dgst` commands share, defined once so each name means one thing.

    --dataset NAME     a dataset of `dgst_tf.data.DATASETS` (fashion_mnist, cifar10, folder)
    --data PATH        where that dataset lives (folder or archive; default: offline places)
    --selection MODE   dynamic: new input channels every step (DGSU); static: fixed ones

    group = parser.add_argument_group("data")
    add_dataset_arguments(group, default="cifar10")
    parser.add_argument("--selection", choices=SELECTIONS, help=SELECTION_HELP)
"""
from __future__ import annotations

import argparse
import dataclasses

SELECTIONS = ("dynamic", "static")
SELECTION_HELP = ("which input channels of a weight-updated layer a step updates: dynamic "
                  "= new ones every step (DGSU, Li & Chang 2024), static = fixed before "
                  "training (Lin et al. 2022)")


def add_dataset_arguments(group, default: str = "cifar10", extra: tuple = (),
                          purpose: str = "") -> None:
    """Add ``--dataset`` (a name of `dgst_tf.data.DATASETS`, plus ``extra`` choices) and
    ``--data`` (its location, ``args.data_path``) to an argparse parser or group."""
    from dgst_tf.data import DATASETS

    group.add_argument("--dataset", default=default, choices=(*DATASETS, *extra),
                       help=f"{purpose + ': ' if purpose else ''}fashion_mnist (Debian's "
                            "dataset-fashion-mnist), cifar10 (../shared/datasets, "
                            "$DGST_CIFAR10 or --data), or folder (--data with train/ and "
                            "test/ image-folder trees)")
    group.add_argument("--data", dest="data_path", default=None,
                       help="dataset location: a folder or cifar10-jpeg.tar.gz (default: "
                            "the offline locations)")


def add_config_arguments(parser, config_class, helps: dict, *, optional_types=None,
                         choices=None, bool_type=None, skip=()) -> None:
    """One ``--field-name`` flag per field of the dataclass ``config_class`` (``data_path``
    is ``--data``), defaulting to the field's default. ``optional_types``: the type of
    fields whose default is None; ``choices``: per field; booleans are
    ``--flag/--no-flag`` unless ``bool_type`` parses a value; ``skip``: fields another
    helper defines (e.g. `dgst_tf.cli.model_args.MODEL_FIELDS`). Example::

        add_config_arguments(parser, DeviceConfig, {"seed": "every random choice"})
        DeviceConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DeviceConfig)})
    """
    optional_types, choices = optional_types or {}, choices or {}
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        kind = optional_types.get(field.name, type(field.default))
        flag = "--data" if field.name == "data_path" else "--" + field.name.replace("_", "-")
        if kind is bool and bool_type is None:
            how = {"action": argparse.BooleanOptionalAction}
        else:
            how = {"type": bool_type if kind is bool else kind,
                   "choices": choices.get(field.name)}
        parser.add_argument(flag, dest=field.name, default=field.default,
                            help=helps.get(field.name), **how)


__all__ = ["SELECTIONS", "SELECTION_HELP", "add_dataset_arguments", "add_config_arguments"]
