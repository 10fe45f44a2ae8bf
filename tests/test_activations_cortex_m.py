"""The training step of an EfficientNet-like (swish, a frozen squeeze-and-excitation gate) and
a MobileNetV3-like (hard-swish) CNN on a simulated Cortex-M7 through real TFLM (CMSIS-NN
build, the dgst ops in tree mode, qemu-system-arm -M mps2-an500; see
tests/test_tflm_cortex_m.py): builtin LOGISTIC / MUL / HARD_SWISH forward and
DGST_ACTIVATION_GRAD backward give the host pip TFLM's losses, logits, trainable tensors and
kept channels bit for bit at every step. Building the TFLM library with these kernels takes
about 10 minutes on 2 cores the first time; missing tools fail the test."""
import numpy as np
import pytest

from test_kernels_mcu import require_tools
from test_own_models import FAMILIES, images

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.export.training import export_training, train_tflm
from dgst_tf.tflm_ops import cortex_m
from dgst_tf.training.scheme import UpdateScheme

pytestmark = pytest.mark.slow
STEPS = 5


@pytest.mark.parametrize("family, builtin", [("efficientnet", "LOGISTIC"),
                                             ("mobilenet_v3", "HARD_SWISH")])
def test_activation_training_steps_on_cortex_m7_equal_host_tflm(family, builtin, tmp_path):
    require_tools()
    build, spec = FAMILIES[family][:2]
    x, y = images(STEPS + 16, seed=3)
    info = export_training(fold_batchnorm(build()), UpdateScheme(spec), x[STEPS:],
                           tmp_path / "t.tflite", learning_rate=0.05, policy="traversal")
    spec_in = info.manifest["inputs"][0]
    codes = np.clip(np.round(x[:STEPS] / spec_in["scale"]) + spec_in["zero_point"], -128,
                    127).astype(np.int8)[:, None]
    labels = y[:STEPS].astype(np.int32)
    host = train_tflm(info.path, codes, labels)
    elf = cortex_m.build_firmware(info.path, tmp_path / "fw", cpu="m7", arena_bytes=160 * 1024)
    device = cortex_m.run_firmware(elf, [codes, labels.reshape(-1, 1)], cpu="m7",
                                   flash=tmp_path / "flash.bin")
    names = info.manifest["outputs"]
    assert len(device.outputs) == len(host.result.outputs) == len(names)
    for name, got, want in zip(names, device.outputs, host.result.outputs):
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert device.ops[builtin][0] > 0 and device.ops["DGST_ACTIVATION_GRAD"][0] == \
        STEPS * info.ops["CUSTOM:DGST_ACTIVATION_GRAD"] > 0
    assert len(set(device.outputs[0][:, 0].tolist())) > 1  # the loss moves
    print(f"\n{family}: instructions per step {device.instructions.tolist()}; "
          f"{builtin} {device.ops[builtin][1] // STEPS}, DGST_ACTIVATION_GRAD "
          f"{device.ops['DGST_ACTIVATION_GRAD'][1] // STEPS} per step; arena "
          f"{device.arena_bytes} B (host {host.arena_bytes} B)")
