"""TFLM's arena of the exported training step in a 32-bit TFLM: the Cortex-M7 firmware in QEMU.

    python benchmarks/tflm_training_memory_cortex_m.py          # ~15 min (builds firmwares)

MobileNetV2 width 0.35 at 128x128 with tiny-training's 49 KB scheme (Lin et al.), static and
on-device DGSU selection (``policy="traversal"``), the firmware graph (`export_training`'s
defaults: offline memory plan with in-place ops, chunked weight gradients, requantization
in flash). Each graph runs one step on the host pip TFLM (64-bit) and in the Cortex-M7
firmware (`dgst_tf.tflm_ops.cortex_m`: TFLM built for the CPU, qemu-system-arm), whose
``arena_used_bytes()`` is the 32-bit TFLM's own figure; both against the memory model
(`MemoryModel(..., tflm_target=...)`) and TinyEngine's 141 KB. Needs arm-none-eabi-gcc
and qemu-system-arm. Writes benchmarks/results/tflm_training_memory_cortex_m.{json,md}.
"""
import argparse
import pathlib
import tempfile

import _report
import numpy as np
from tflm_training_memory import LIN_49KB, TINYENGINE_KB

from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.export.training import export_training, train_tflm
from dgst_tf.models import mobilenet_v2
from dgst_tf.planning.memory import KB, MemoryModel
from dgst_tf.tflm_ops import cortex_m
from dgst_tf.training.scheme import UpdateScheme


def _kb(n):
    return round(n / KB, 1)


def step_row(model, scheme, images, policy, folder: pathlib.Path) -> dict:
    """One graph: host TFLM, Cortex-M7 TFLM, the memory model for both."""
    info = export_training(model, scheme, images, folder / "train.tflite", learning_rate=0.001,
                           num_samples=len(images), policy=policy, output_params=False)
    label = np.array([3], np.int32)
    host = train_tflm(info.path, images[:1], label)
    spec = info.manifest["inputs"][0]
    x = np.clip(np.round(images[:1] / spec["scale"]) + spec["zero_point"], -128, 127).astype(
        np.int8)
    elf = cortex_m.build_firmware(info.path, folder / "fw", arena_bytes=400 * 1024,
                                  fit_budget=False)
    device = cortex_m.run_firmware(elf, [x, label.reshape(1, 1)])
    analytic = {target: MemoryModel(model, policy=policy, output_params=False,
                                    tflm_target=target).arena_bytes(scheme)
                for target in ("host", "cortex-m")}
    return {"selection": policy or "static",
            "host_tflm_kb": _kb(host.arena_bytes), "host_analytic_kb": _kb(analytic["host"]),
            "host_analytic_vs_tflm_pct": round(100 * (analytic["host"] / host.arena_bytes - 1),
                                               2),
            "cortex_m7_tflm_kb": _kb(device.arena_bytes),
            "cortex_m_analytic_kb": _kb(analytic["cortex-m"]),
            "cortex_m_analytic_vs_tflm_pct": round(
                100 * (analytic["cortex-m"] / device.arena_bytes - 1), 2),
            "same_loss": bool(np.array_equal(device.outputs[0].reshape(-1)[:1],
                                             host.losses[:1])),
            "tinyengine_kb": TINYENGINE_KB,
            "host_fits_141kb": host.arena_bytes <= TINYENGINE_KB * KB,
            "cortex_m7_fits_141kb": device.arena_bytes <= TINYENGINE_KB * KB}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    runtime.limit_threads(1)
    model = fold_batchnorm(mobilenet_v2(0.35, (args.size, args.size, 3), classes=10,
                                        weights=None, seed=args.seed))
    scheme = UpdateScheme.from_backward_config(model, *LIN_49KB)
    images = np.random.default_rng(args.seed).uniform(
        -1, 1, (8, args.size, args.size, 3)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dgst-bench-m7-") as tmp:
        for policy in (None, "traversal"):
            folder = pathlib.Path(tmp) / (policy or "static")
            folder.mkdir()
            rows.append(step_row(model, scheme, images, policy, folder))
    settings = {"model": f"mobilenet_v2 w0.35 {args.size}x{args.size}, 10 classes, random "
                         "init (memory does not depend on the weights)",
                "scheme": "tiny-training 49KB", "graph": "firmware graph (loss + logits "
                "out), export_training defaults", "cortex_m": "Cortex-M7 firmware in "
                "qemu-system-arm (mps2-an500), TFLM's arena_used_bytes()"}
    print(_report.write("tflm_training_memory_cortex_m", settings, rows, list(rows[0])))


if __name__ == "__main__":
    main()
