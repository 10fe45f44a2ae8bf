"""`dgst federate`: federated sparse fine-tuning of simulated microcontrollers on one machine.

    dgst federate                                    # Fashion-MNIST, 5 devices, 3 rounds, DGSU
    dgst federate --dataset cifar10 --clients 10 --partition dirichlet --alpha 0.1 \\
        --method dgsu --encoding int8 --rounds 20 --output-dir runs/fed_c10

Flower's simulation engine on Ray runs one ClientApp per device (batch-1 sparse training on
its partition, inside --sram-budget, sending only the changed channels) and the ServerApp
(per-channel FedAvg, test accuracy every round); `dgst_tf.federated`. Writes
``results.json`` (accuracy per round, uplink bytes per client per round) into --output-dir.
"""
from __future__ import annotations

import argparse
import dataclasses

_HELP = {
    "dataset": "fashion_mnist or cifar10 (offline) or folder (--data)",
    "train_examples": "training images split over the devices",
    "test_examples": "test images the server evaluates on after every round",
    "classes": "classifier outputs (0: from the dataset)",
    "partition": "iid or dirichlet (label skew, --alpha)",
    "alpha": "Dirichlet concentration: 0.1 strongly non-IID, 1.0 mildly",
    "per_channel": "average each channel over the devices that updated it (else plain FedAvg)",
    "weights": "imagenet (offline, width 1.0 only) or none",
    "method": "what a device's step updates (dgst_tf.training.methods)",
    "target_fraction": "fraction of conv weights updated per step (sparse methods)",
    "blocks": "sparse methods update the last N inverted-residual blocks",
    "int8": "true: the device's int8 QAS step (int8 weights, int32 biases exchanged)",
    "sram_budget": "each device's SRAM for the training step, e.g. 256KB (none: no check)",
    "encoding": "uplink values: int8, fp16 or fp32",
    "num_cpus": "CPUs Ray may use (one device trains per CPU at a time)",
    "round_timeout": "seconds a round may take before the run stops",
}
_OPTIONAL_TYPES = {"data_path": str, "sram_budget": str}


def add_federate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``federate`` sub-command to ``dgst``'s sub-parsers; returns its parser.

        sub = parser.add_subparsers(dest="command")
        add_federate_parser(sub)
    """
    from dgst_tf.cli.common_args import add_config_arguments
    from dgst_tf.cli.model_args import MODEL_FIELDS, add_model_arguments
    from dgst_tf.federated.config import FederatedConfig, parse_bool

    federate = subparsers.add_parser(
        "federate", help="federated sparse fine-tuning of simulated devices (Flower on Ray)",
        description=__doc__.splitlines()[0])
    defaults = FederatedConfig()
    add_model_arguments(federate, width=defaults.width, image_size=defaults.image_size,
                        weights=defaults.weights, weights_help=_HELP["weights"],
                        classes=False)
    add_config_arguments(federate, FederatedConfig, _HELP, optional_types=_OPTIONAL_TYPES,
                         bool_type=parse_bool, skip=MODEL_FIELDS)
    federate.add_argument("--output-dir", default="federated_run",
                          help="results.json goes here")
    federate.add_argument("--verbose", action="store_true", help="Flower's debug log")
    federate.set_defaults(func=run_federate)
    return federate


def run_federate(args) -> int:
    """Run ``dgst federate`` from parsed arguments (0 on success)."""
    from dgst_tf.cli.model_args import model_settings
    from dgst_tf.core import runtime
    from dgst_tf.federated.config import FederatedConfig
    from dgst_tf.federated.simulation import run_federated
    from dgst_tf.models.own_model import is_model_file, load_own_model

    runtime.limit_threads(1)
    fields = {f.name for f in dataclasses.fields(FederatedConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields} | model_settings(args)
    if options["weights"] == "":
        options["weights"] = None
    if options["sram_budget"] in ("none", ""):
        options["sram_budget"] = None
    if is_model_file(args.model):  # refused here, before Ray starts or anything is written
        load_own_model(args.model, options["image_size"], args.classes or None)
    results = run_federated(FederatedConfig(**options), output_dir=args.output_dir,
                            verbose=args.verbose)
    for row in results["rounds"]:
        uplink = row.get("uplink_bytes")
        sent = (f", uplink {min(uplink):,}-{max(uplink):,} B per device" if uplink else
                " (initial model)")
        print(f"round {row['round']:3d}  test accuracy {100 * row['accuracy']:6.2f}%{sent}")
    print(f"dense float32 update would be {results['dense_fp32_update_bytes']:,} B; "
          f"wrote {args.output_dir}/results.json")
    return 0
