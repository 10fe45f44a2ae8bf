"""The exported training step on a simulated Cortex-M7 through real TFLM: TFLM built from
source for cortex_m_generic / cortex-m7+fp with CMSIS-NN and the dgst ops compiled in
(tree mode), a firmware holding the model in flash, run in qemu-system-arm -M mps2-an500.
Oracle: the host pip TFLM with libdgst_tflm_ops.so (`train_tflm`), bit for bit at every
step (losses, logits, every trainable tensor, the on-device selection).

The library build happens here when it is missing (TFLM's core, the TFLM kernels these
graphs' builtins need, all of CMSIS-NN and the dgst ops: about 230 files, several minutes
on 2 cores); it needs
make, arm-none-eabi-gcc with newlib, qemu-system-arm, and the pinned TFLM archives
(tflm_ops/Makefile TFLM_DEPS) or network access. Missing tools fail these tests.
"""
import subprocess

import numpy as np
import pytest

from small_models import batch, residual_cnn
from test_kernels_mcu import require_tools

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.export.training import export_training, train_tflm
from dgst_tf.tflm_ops import cortex_m
from dgst_tf.training.scheme import UpdateScheme

pytestmark = pytest.mark.slow
STEPS = 5
LR = 0.05
SCHEME = {"head": "bias", "project": 0.5, "depthwise": "bias"}


@pytest.fixture(scope="module")
def tools():
    require_tools()


def _quantized_steps(manifest, x):
    spec = manifest["inputs"][0]
    q = np.clip(np.round(x / spec["scale"]) + spec["zero_point"], -128, 127).astype(np.int8)
    return q[:, None]


@pytest.fixture(scope="module", params=["first", "traversal"])
def exported(request, tmp_path_factory):
    """A tiny residual CNN's training step: static selection, or DGSU traversal on device."""
    model = fold_batchnorm(residual_cnn())
    x, y = batch(32)
    path = tmp_path_factory.mktemp(f"train_{request.param}") / "train.tflite"
    kwargs = ({"selection": "first"} if request.param == "first"
              else {"policy": request.param})
    info = export_training(model, UpdateScheme(SCHEME), x, path, learning_rate=LR, **kwargs)
    images = _quantized_steps(info.manifest, x[:STEPS])
    labels = y[:STEPS].astype(np.int32)
    return info, images, labels


def test_training_steps_on_cortex_m7_are_bit_identical_to_host_tflm(tools, exported,
                                                                     tmp_path):
    info, images, labels = exported
    host = train_tflm(info.path, images, labels)
    elf = cortex_m.build_firmware(info.path, tmp_path / "fw", arena_bytes=64 * 1024)
    again = cortex_m.build_library("m7", kernels=cortex_m.model_kernels(info.path))
    assert "building TFLM" not in again, "an up-to-date library was rebuilt"
    device = cortex_m.run_firmware(elf, [images, labels.reshape(-1, 1)])

    names = info.manifest["outputs"]
    assert len(device.outputs) == len(host.result.outputs) == len(names)
    for name, got, want in zip(names, device.outputs, host.result.outputs):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        for step in range(STEPS):
            np.testing.assert_array_equal(got[step], want[step],
                                          err_msg=f"{name} differs at step {step}")
    # the run is a real training run: the loss moves and trainable tensors change each step
    assert len(set(device.outputs[0][:, 0].tolist())) > 1
    params = [j for j, name in enumerate(names) if j >= 2 and not name.endswith("/kept")]
    assert params
    for j in params:
        moved = [not np.array_equal(device.outputs[j][s], device.outputs[j][s + 1])
                 for s in range(STEPS - 1)]
        assert any(moved), f"{names[j]} never changed on the device"
    # 32-bit pointers and structs: the M7 arena is smaller than the 64-bit host's
    assert 0 < device.arena_bytes < host.arena_bytes
    assert device.instructions.shape == (STEPS,) and (device.instructions > 0).all()
    print(f"\n{info.manifest.get('policy', 'static')}: arena_used_bytes M7 "
          f"{device.arena_bytes} B, host {host.arena_bytes} B; instructions per step "
          f"{device.instructions.tolist()}; stack {device.stack_bytes} B")
    print((elf.parent / "size.txt").read_text())


def test_firmware_inputs_and_models_are_checked(exported, tmp_path):
    info, images, labels = exported
    with pytest.raises(ValueError, match="one entry per step"):
        cortex_m.run_firmware(tmp_path / "none.elf", [images, labels[:2].reshape(-1, 1)])
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ValueError, match="bad.tflite is not a .tflite"):
        cortex_m.embed_model(bad, tmp_path / "fw")
    with pytest.raises(ValueError, match="cpu must be one of"):
        cortex_m.build_library("m33")
    source, header = cortex_m.embed_model(info.path, tmp_path / "fw")
    # the builtins the graph's operators use, not every operator code of the file
    assert "X(AddAdd) X(AddFullyConnected) X(AddMean)\n" in header.read_text()
    assert cortex_m.model_kernels(info.path) == ["add", "fully_connected", "reduce"]
    assert f"[{info.path.stat().st_size}]" in source.read_text()
