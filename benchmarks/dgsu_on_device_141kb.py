"""Can on-device DGSU selection run in TinyEngine's 141 KB? A lower bound for Lin's scheme,
and the DGSU scheme the planner finds under 141 KB, confirmed by TFLM's arena.

    python benchmarks/dgsu_on_device_141kb.py            # ~5 min on 2 cores

MobileNetV2-0.35 at 128x128 (random init: memory does not depend on the weights). With
selection on the device (``policy="traversal"``) any channel of a weight-updated layer can
be chosen at any step, so its whole kernel (int8) and bias (int32) are mutable and live in
SRAM for the whole run; the input image (int8) is live while the first operator reads it.
Both are in TFLM's arena at once, so their sum bounds the arena from below whatever the
planner, fusion or in-place tricks do. Lin's 49 KB scheme (mit-han-lab/tiny-training,
``sparse_update_config["mbv2"]``) updates the weights of 7 layers and the biases of 16;
those whole kernels, the biases and the image are 145.7 KB, over 141 KB before any
activation, node or tensor struct.

Second part: `dgst_tf.jobs.device_plan.plan_dgsu` with a 141 KB SRAM budget (DGSU over the
pointwise convs of the last blocks, <= 2% of conv weights per step, the exporter's default
firmware graph), its TFLM arena on the 64-bit host and the analytic 32-bit figure; if no
scheme fits, the refusal with every size tried and the shallowest scheme's figures (its one
block holds the 1280x112 head conv, whose whole kernel alone is about 140 KB).
Writes benchmarks/results/dgsu_on_device_141kb.{json,md}.
"""
import argparse
import pathlib
import tempfile

import _report
import numpy as np

from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.jobs.device_plan import deployable_memory, dgsu_scheme, plan_dgsu
from dgst_tf.jobs.stages import StageBudgetError
from dgst_tf.models import mobilenet_v2
from dgst_tf.planning.memory import KB, MemoryModel
from dgst_tf.training.scheme import UpdateScheme

LIN_49KB = (16, [36, 39, 40, 41, 42, 45, 48, 49], [1, 1, 0, 0.25, 0.125, 0.125, 0.125, 0.125])
TINYENGINE_BYTES = 141 * 1024
COLUMNS = ["what", "scheme", "updated_fraction", "mutable_weights_kb", "input_kb",
           "lower_bound_kb", "analytic_kb", "analytic_32bit_kb", "tflm_arena_kb",
           "fits_141kb", "file_kb"]


def _mutable_weight_bytes(model, scheme) -> int:
    """Whole int8 kernels of the weight-updated layers (on-device selection) + the int32
    biases of every bias-updated layer."""
    total = 0
    for name, update in scheme.layers.items():
        layer = model.get_layer(name)
        kernel = layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel
        total += int(np.prod(kernel.shape)) if update.updates_weights else 0
        total += 4 * int(layer.bias.shape[0]) if update.updates_bias else 0
    return total


def _lin_row(model, size) -> dict:
    scheme = UpdateScheme.from_backward_config(model, *LIN_49KB)
    weights, image = _mutable_weight_bytes(model, scheme), size * size * 3
    return {"what": "lower bound, on-device selection", "scheme": "Lin 49 KB",
            "updated_fraction": round(float(scheme.updated_weight_fraction(model)), 4),
            "mutable_weights_kb": round(weights / KB, 1), "input_kb": round(image / KB, 1),
            "lower_bound_kb": round((weights + image) / KB, 1),
            "fits_141kb": weights + image <= TINYENGINE_BYTES}


def _planned_row(model, size, budget, seed, tmp) -> dict:
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (8, size, size, 3)).astype(np.float32)
    row = {"what": f"plan_dgsu under {budget // KB} KB, on-device selection",
           "input_kb": round(size * size * 3 / KB, 1)}
    try:
        plan = plan_dgsu(model, images, rng.integers(0, 10, 8), tmp / "dgsu.tflite",
                         sram_budget=budget, blocks=8, target_fraction=0.02,
                         learning_rate=0.001, seed=seed)
    except StageBudgetError as error:  # the shallowest scheme's figures, and every one tried
        one = dgsu_scheme(model, 1, 0.02, seed)
        weights = _mutable_weight_bytes(model, one)
        return row | {"scheme": "none fits; shown: DGSU, last 1 block",
                      "updated_fraction": round(float(one.updated_weight_fraction(model)), 4),
                      "mutable_weights_kb": round(weights / KB, 1),
                      "lower_bound_kb": round((weights + size * size * 3) / KB, 1),
                      "analytic_kb": round(deployable_memory(model, one).arena_bytes / KB, 1),
                      "fits_141kb": False, "refusal": str(error)}
    cortex_m = MemoryModel(model, policy="traversal", rounding="stochastic",
                           output_params=False, tflm_target="cortex-m")
    weights = _mutable_weight_bytes(model, plan.scheme)
    return row | {
        "scheme": f"DGSU, last {plan.blocks} blocks",
        "updated_fraction": round(float(plan.scheme.updated_weight_fraction(model)), 4),
        "mutable_weights_kb": round(weights / KB, 1),
        "lower_bound_kb": round((weights + size * size * 3) / KB, 1),
        "analytic_kb": round(plan.analytic_bytes / KB, 1),
        "analytic_32bit_kb": round(cortex_m.arena_bytes(plan.scheme) / KB, 1),
        "tflm_arena_kb": round(plan.arena_bytes / KB, 1),
        "fits_141kb": plan.arena_bytes <= TINYENGINE_BYTES,
        "file_kb": round(plan.file_bytes / KB, 1), "tried": plan.tried}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--budget-kb", type=int, default=141)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    runtime.limit_threads()
    size = args.image_size
    model = fold_batchnorm(mobilenet_v2(0.35, (size, size, 3), classes=10, weights=None,
                                        seed=args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_lin_row(model, size),
                _planned_row(model, size, args.budget_kb * KB, args.seed, pathlib.Path(tmp))]
    settings = {"model": f"mobilenet_v2 w0.35 {size}x{size}, 10 classes, random init",
                "policy": "traversal (selection on device), stochastic rounding, firmware "
                          "graph (export defaults)", "tinyengine_kb": 141}
    print(_report.write("dgsu_on_device_141kb", settings, rows, COLUMNS))


if __name__ == "__main__":
    main()
