"""`dgst plan`: choose an update scheme that fits a memory budget, before training.

    dgst plan --model mobilenet_v2 --width 0.35 --image-size 128 --budget 256KB
    dgst plan --width 1.0 --image-size 96 --budget 99KB --memory extra_memory \
        --contributions measured --dataset cifar10 --search evolutionary --output scheme.json
    dgst plan --budget 256KB --selection static    # channels fixed at export (Lin et al.)

The memory is that of the training step `export_training` (``dgst export``) emits by
default: fused frozen blocks, folded pads, requantization in flash, stochastic rounding,
and -- here by default -- the channels chosen on device every step (``--policy
traversal``, DGSU), so the whole kernels of weight-updated layers stay in SRAM. By default
the budget limits TFLM's whole arena for the step (``--memory arena``). Prints the chosen
scheme, its memory breakdown and dense vs sparse; writes the scheme JSON
(`UpdateScheme.save`) that ``dgst train --scheme`` and `SparseUpdateModel` take, and beside
it ``<scheme>_memory.png``: per layer, the SRAM in use against the budget and what it holds
(`dgst_tf.jobs.figures.memory_bars`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from dgst_tf.cli.common_args import SELECTION_HELP, SELECTIONS, add_dataset_arguments
from dgst_tf.cli.model_args import add_model_arguments, model_from_args

PLAN_POLICIES = ("static", "traversal", "magnitude", "window")


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` sub-command to ``dgst``'s sub-parsers; returns its parser.

        sub = parser.add_subparsers(dest="command")
        add_plan_parser(sub)
    """
    plan = subparsers.add_parser(
        "plan", help="choose an update scheme that fits a memory budget",
        description=__doc__.splitlines()[0])
    add_model_arguments(plan, width=0.35, image_size=128)
    memory = plan.add_argument_group("memory")
    memory.add_argument("--budget", default="256KB",
                        help="bytes or a size: 256KB, 1MB (KB = 1024 bytes)")
    memory.add_argument("--memory", dest="accounting", default="arena",
                        choices=("arena", "training_peak", "extra_memory"),
                        help="what the budget limits: TFLM's whole arena for the step "
                             "(default; 64-bit host structs), the step's tensors at their "
                             "peak, or Lin et al.'s extra-memory label")
    memory.add_argument("--gradient-bytes", type=int, default=4, choices=(1, 2, 4),
                        help="bytes per activation-gradient element (4: float32, as exported)")
    memory.add_argument("--optimizer", default="sgd", choices=("sgd", "momentum", "adam"))
    memory.add_argument("--inplace-depthwise", action="store_true",
                        help="a runtime that computes depthwise convs in place (tinyengine)")
    step = plan.add_argument_group("exported step (as export_training / dgst export)")
    step.add_argument("--selection", choices=SELECTIONS, default=None,
                      help=SELECTION_HELP + "; static = --policy static; dynamic keeps whole "
                           "kernels in SRAM (default: dynamic, by --policy)")
    step.add_argument("--policy", default="traversal", choices=PLAN_POLICIES,
                      help="how the device chooses the kept channels each step (traversal: "
                           "DGSU; default), or static (chosen at export)")
    step.add_argument("--layers-per-step", type=int, default=None,
                      help="only this many weight-updated layers update per step, in turn")
    step.add_argument("--fused-blocks", action=argparse.BooleanOptionalAction, default=True,
                      help="frozen conv -> depthwise -> 1x1 chains run row by row "
                           "(DGST_FUSED_BLOCK; default on, as exported)")
    step.add_argument("--fold-pads", action=argparse.BooleanOptionalAction, default=True,
                      help="explicit pads folded into SAME convs (default on, as exported)")
    step.add_argument("--requant-in-flash", action=argparse.BooleanOptionalAction,
                      default=True, help="requantization constants in flash (default on)")
    step.add_argument("--kept-weights-in-ram", action=argparse.BooleanOptionalAction,
                      default=True, help="static selection: only the kept channels' weights "
                                         "in RAM (default on)")
    step.add_argument("--rounding", default="stochastic", choices=("stochastic", "nearest"))
    step.add_argument("--output-params", action=argparse.BooleanOptionalAction, default=True,
                      help="trainable tensors as graph outputs (default, as dgst export "
                           "writes it; --no-output-params: the firmware graph)")
    search = plan.add_argument_group("search")
    search.add_argument("--contributions", default="analytic",
                        choices=("analytic", "measured"),
                        help="analytic: instant proxy (later layers gain more); measured: "
                             "short fine-tuning runs on --dataset (cached)")
    search.add_argument("--search", default="evolutionary", choices=("evolutionary", "random"),
                        help="the search algorithm over schemes")
    search.add_argument("--evaluations", type=int, default=2000)
    search.add_argument("--seed", type=int, default=0)
    data = plan.add_argument_group("data (measured contributions)")
    add_dataset_arguments(data, default="cifar10", purpose="measured contributions")
    data.add_argument("--train-examples", type=int, default=400)
    data.add_argument("--validation-examples", type=int, default=200)
    data.add_argument("--steps", type=int, default=50, help="SGD steps per fine-tuning run")
    data.add_argument("--workers", type=int, default=None,
                      help="fine-tuning runs at a time on a local Ray (default: the cores)")
    data.add_argument("--ray-address", default=None,
                      help="run them on this Ray cluster instead (every node needs dgst-tf)")
    data.add_argument("--no-ray", dest="parallel", action="store_false",
                      help="run them one after another in this process")
    data.add_argument("--batch-size", type=int, default=8)
    data.add_argument("--learning-rate", type=float, default=0.01)
    out = plan.add_argument_group("output")
    out.add_argument("--output", default="scheme.json", help="scheme JSON to write")
    out.add_argument("--chart", default=None, help="also write a PNG memory chart here")
    out.add_argument("--report", default=None,
                     help="also write the search result and memory report as JSON here")
    plan.set_defaults(func=run_plan)
    return plan


def _measured_table(args, model):
    from dgst_tf import data
    from dgst_tf.core import runtime
    from dgst_tf.planning.contribution import FineTuneSettings, measure_contributions

    runtime.limit_threads()
    common = dict(path=args.data_path, image_size=(args.image_size, args.image_size),
                  preprocessing="torch", seed=args.seed, validation_split=0.2)
    train = data.load(args.dataset, "train", batch_size=args.batch_size,
                      limit=args.train_examples, subset="training", **common)
    val = data.load(args.dataset, "train", batch_size=64, limit=args.validation_examples,
                    subset="validation", **common)
    settings = FineTuneSettings(steps=args.steps, batch_size=args.batch_size,
                                learning_rate=args.learning_rate, seed=args.seed)
    return measure_contributions(model, train, val, settings=settings, parallel=args.parallel,
                                 ray_address=args.ray_address, workers=args.workers)


def _policy(args) -> str | None:
    """The on-device selection policy (None: static) from --selection and --policy."""
    if args.selection == "static":
        return None
    if args.selection == "dynamic" and args.policy == "static":
        raise ValueError("--selection dynamic needs an on-device --policy: traversal, "
                         "magnitude or window")
    return None if args.policy == "static" else args.policy


def run_plan(args) -> int:
    """Run ``dgst plan`` from parsed arguments (0 on success)."""
    from dgst_tf.models.own_model import is_model_file
    from dgst_tf.planning.budget import parse_budget
    from dgst_tf.planning.contribution import analytic_contributions
    from dgst_tf.planning.memory import MemoryModel, kb
    from dgst_tf.planning.search import search_scheme

    budget = parse_budget(args.budget)
    policy = _policy(args)
    model, description = model_from_args(args)
    memory_model = MemoryModel(model, (args.image_size, args.image_size, 3),
                               gradient_bytes=args.gradient_bytes, optimizer=args.optimizer,
                               inplace_depthwise=args.inplace_depthwise, policy=policy,
                               fuse_blocks=args.fused_blocks, fold_pads=args.fold_pads,
                               requant_in_flash=args.requant_in_flash,
                               kept_weights_in_ram=args.kept_weights_in_ram,
                               rounding=args.rounding, layers_per_step=args.layers_per_step,
                               output_params=args.output_params)
    if args.contributions == "measured":
        table = _measured_table(args, model)
    else:
        table = analytic_contributions(model)
    print(f"model     {description}: {model.name}, {len(memory_model.convs)} convs, input "
          f"{args.image_size}x{args.image_size}x3, {int(model.outputs[0].shape[-1])} classes")
    print(f"budget    {kb(budget)} ({budget} bytes) on the {args.accounting.replace('_', ' ')}"
          f"; selection {policy or 'static'}; contributions {table.source}"
          + (" (proxy: later layers gain more)" if table.source == "analytic" else ""))
    result = search_scheme(model, table, budget, accounting=args.accounting,
                           method=args.search, evaluations=args.evaluations, seed=args.seed,
                           memory_model=memory_model)
    result.scheme.name = f"plan_{args.budget}"
    print(f"scheme    {result.describe()}")
    config = result.backward_config()
    print(f"tiny-training backward_config: n_bias_update={config['n_bias_update']} "
          f"manual_weight_idx={config['manual_weight_idx'] or '-'} "
          f"weight_update_ratio={config['weight_update_ratio'] or '-'}")
    report = memory_model.report(result.scheme)
    print(report.table())
    result.scheme.save(args.output)
    selection = "static" if policy is None else "dynamic"
    source = (f"--model {args.model}" if is_model_file(args.model) else
              f"--width {args.width:g}")
    print(f"wrote     {args.output}  (train with: dgst train --scheme {args.output} "
          f"--selection {selection} {source} --image-size {args.image_size})")
    _write_memory_bars(report, budget, args)
    if args.chart:
        from dgst_tf.planning.memory_report import plot_memory

        print(f"wrote     {plot_memory(report, args.chart)}")
    if args.report:
        from dgst_tf.core.files import write_atomically

        payload = {"search": result.to_dict(), "memory": report.to_dict(),
                   "contributions": table.to_dict()}
        write_atomically(args.report, json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote     {args.report}")
    return 0


def memory_bars_path(output) -> pathlib.Path:
    """Where `dgst plan` writes the per-layer memory bars: beside the scheme JSON
    (``plan/scheme.json`` -> ``plan/scheme_memory.png``)."""
    output = pathlib.Path(output)
    return output.with_name(f"{output.stem}_memory.png")


def _write_memory_bars(report, budget: int, args) -> None:
    """Per-layer memory against the budget (`dgst_tf.jobs.figures.memory_bars`); a missing
    matplotlib costs only the picture."""
    from dgst_tf.jobs.figures import memory_bars, save_png

    try:
        path = save_png(memory_bars(report, budget, args.accounting),
                        memory_bars_path(args.output))
    except ImportError as err:
        print(f"no figure {err}", file=sys.stderr)
        return
    print(f"wrote     {path}  (per layer: SRAM in use against the budget, what it holds)")


__all__ = ["add_plan_parser", "memory_bars_path", "run_plan"]
