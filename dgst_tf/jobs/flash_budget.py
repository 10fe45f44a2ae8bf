"""Does on-device training fit the device's flash? The deployable training `.tflite` (what
`export_training` writes; its JSON manifest is not flashed) plus the firmware that runs it.

`deployable_training_bytes` exports the training step to a temporary folder and returns the
file's size (the exact figure; `dgst_tf.pruning.model_size.deployable_size` estimates it
without exporting, within 3 %); `flash_budget_check` adds `FIRMWARE_ALLOWANCE_BYTES` and
raises `FlashBudgetError` with the numbers when the sum exceeds the budget::

    from dgst_tf.jobs.flash_budget import deployable_training_bytes, flash_budget_check

    nbytes = deployable_training_bytes(model, x_train[:64], learning_rate=0.05)
    headroom = flash_budget_check(nbytes, 1024 * 1024)     # bytes left, or FlashBudgetError
"""
from __future__ import annotations

import pathlib
import tempfile

__all__ = ["FIRMWARE_ALLOWANCE_BYTES", "FlashBudgetError", "deployable_training_bytes",
           "flash_budget_check"]

# Flash the firmware needs besides the model: TFLM's runtime (interpreter, allocator, flatbuffer
# reading), the builtin kernels a training graph uses (CMSIS-NN), the 16 dgst training ops and
# application code. Measured 2026-12-04 on the firmware that runs an exported training step
# (tflm_ops/firmware/dgst_train_main.cc: model in flash, resolver with the model's builtins
# and all dgst ops, semihosting I/O) linked with TFLM's microlite library built from source
# (pinned tflite-micro 90b983c2, cortex_m_generic, cortex-m7+fp, CMSIS-NN, -Os; the firmware
# -O2, newlib-nano, --gc-sections, arm-none-eabi-gcc 12.2):
#     make -C tflm_ops tflm-firmware CPU=m7 MODEL=train.tflite FW_DIR=fw
#     arm-none-eabi-size -A fw/firmware.elf    # .isr_vector+.text+.rodata+.ARM.exidx+.data
#     arm-none-eabi-nm -S fw/firmware.elf | grep dgst_model_data   # the model, subtracted
# - MobileNetV2-0.35 96x96, default export (DGST_CONV2D and fused blocks; builtins ADD,
#   FULLY_CONNECTED, MEAN), classifier only or a DGSU-like sparse scheme: 113,800 B
#   (.text+.rodata 113,616 B); from the map: TFLM runtime + builtin kernels 41.5 KB, dgst ops
#   35.8 KB, newlib-nano + semihosting + libgcc 17.8 KB, CMSIS-NN 16.3 KB, main + startup
#   3.4 KB. It ran a training step in qemu-system-arm -M mps2-an500 (arena 72,596 B).
# - an export with builtin CONV_2D, DEPTHWISE_CONV_2D and PAD (fuse_blocks, requant_in_flash
#   and fold_pads off), which link CMSIS-NN's convolutions too: 163,008 B.
# Since then the faster Cortex-M7 kernels grew the dgst ops from 42.4 to 52.9 KB: the firmware
# of the device pipeline's pruned MobileNetV2-1.0 (default export) measured 137.7 KB of code
# (benchmarks/results/cortex_m_training_pipeline.md); the builtin-conv export would now need
# about 174 KB.
# The allowance, 160 KiB, covers the default export with 22 KB for the application's own code
# (drivers, sensor input) beyond the measured harness; give an export with builtin convs a
# larger allowance (`firmware_allowance`).
FIRMWARE_ALLOWANCE_BYTES = 160 * 1024


class FlashBudgetError(ValueError):
    """The deployable training file plus the firmware allowance exceed the flash budget."""


def deployable_training_bytes(model, representative_images, scheme=None,
                              **export_training_kwargs) -> int:
    """Bytes of the training-step `.tflite` `export_training` writes for ``model`` and
    ``scheme`` (None: only the classifier trains); exported into a temporary folder that
    is removed again. ``export_training_kwargs`` go to `export_training`.

        deployable_training_bytes(model, x_train[:64], UpdateScheme({"conv_3": 0.5}))
    """
    from dgst_tf.export.training import export_training
    from dgst_tf.training.scheme import UpdateScheme

    scheme = scheme if scheme is not None else UpdateScheme({})
    with tempfile.TemporaryDirectory(prefix="dgst-flash-budget-") as folder:
        info = export_training(model, scheme, representative_images,
                               pathlib.Path(folder) / "train.tflite", **export_training_kwargs)
        return int(info.path.stat().st_size)


def flash_budget_check(file_bytes: int, budget_bytes: int, *,
                       allowance_bytes: int = FIRMWARE_ALLOWANCE_BYTES,
                       what: str = "the deployable training .tflite") -> int:
    """The flash left once ``file_bytes`` and the firmware allowance are in ``budget_bytes``;
    raises `FlashBudgetError` naming the three numbers when they do not fit.

        flash_budget_check(deployable_training_bytes(model, images), 1024 * 1024)
    """
    file_bytes, budget_bytes, allowance_bytes = (int(file_bytes), int(budget_bytes),
                                                 int(allowance_bytes))
    for name, value in (("file_bytes", file_bytes), ("budget_bytes", budget_bytes),
                        ("allowance_bytes", allowance_bytes)):
        if value < 0:
            raise ValueError(f"flash_budget_check: {name} must be >= 0, got {value}")
    needed = file_bytes + allowance_bytes
    if needed > budget_bytes:
        raise FlashBudgetError(
            f"{what} ({file_bytes} bytes) + the firmware allowance ({allowance_bytes} bytes) "
            f"= {needed} bytes, {needed - budget_bytes} bytes over the flash budget of "
            f"{budget_bytes} bytes")
    return budget_bytes - needed
