"""The flags several `dgst` commands share, defined once so each name means one thing.

    --dataset NAME     a dataset of `dgst_tf.data.DATASETS` (fashion_mnist, cifar10, folder)
    --data PATH        where that dataset lives (folder or archive; default: offline places)
    --selection MODE   dynamic: new input channels every step (DGSU); static: fixed ones

    group = parser.add_argument_group("data")
    add_dataset_arguments(group, default="cifar10")
    parser.add_argument("--selection", choices=SELECTIONS, help=SELECTION_HELP)
"""
from __future__ import annotations

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


__all__ = ["SELECTIONS", "SELECTION_HELP", "add_dataset_arguments"]
