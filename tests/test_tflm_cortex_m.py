"""The exported training step on a simulated Cortex-M7 and Cortex-M4 through real TFLM: TFLM
built from source for cortex_m_generic / cortex-m7+fp and cortex-m4+fp with CMSIS-NN and the
dgst ops compiled in (tree mode), a firmware holding the model in flash, run in
qemu-system-arm -M mps2-an500 (M7) and -M mps2-an386 (M4). Oracle: the host pip TFLM with
libdgst_tflm_ops.so (`train_tflm`), bit for bit at every step (losses, logits, every
trainable tensor, the on-device selection) and in the state committed to flash.

One exception, on the M4 only: the loss may be 1 ULP off (measured: it is, in the static
graph). It is `logf` of the softmax sum (tflm_ops/core/softmax_xent_grad.c), and newlib's
single-precision-FPU multilib (the M4's, thumb/v7e-m+fp/hard) has other `expf`/`logf` than
glibc and the M7's (v7e-m+dp/hard): on 100,000 arguments each (expf on [-30, 0], logf on
[1, 21], the same C program built for the host, the M4 and the M7) the M4's differ from
glibc's in 9,714 / 4,751 results (all by 1 ULP), the M7's in none. Everything that trains
(logits, gradients, weights, selection) must still be identical: an `expf` difference that
reaches them fails.

The library builds happen here when they are missing (per CPU: TFLM's core, the TFLM kernels
these graphs' builtins need, all of CMSIS-NN and the dgst ops: about 230 files, several
minutes on 2 cores); they need
make, arm-none-eabi-gcc with newlib, qemu-system-arm, and the pinned TFLM archives
(tflm_ops/Makefile TFLM_DEPS) or network access. Missing tools fail these tests.
"""
import pathlib

import numpy as np
import pytest

from small_models import batch, residual_cnn
from test_kernels_mcu import require_tools

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.export.training import (export_training, initial_params, run_inference_tflm,
                                     train_tflm, write_inference_model)
from dgst_tf.tflm_ops import cortex_m
from dgst_tf.tflm_ops.mcu import linker_map
from dgst_tf.training.scheme import UpdateScheme

pytestmark = pytest.mark.slow
STEPS = 5
LR = 0.05
SCHEME = {"head": "bias", "project": 0.5, "depthwise": "bias"}
ARENA = 64 * 1024


def _library_sources() -> dict:
    """Modification times of the dgst sources compiled into the TFLM library."""
    here = pathlib.Path(cortex_m.__file__).parent
    files = [*here.glob("core/*.[ch]"), *here.glob("tflm/*.cc"), *here.glob("tflm/*.h"),
             here / "dgst_train_kernels.inc", here / "firmware" / "Makefile_internal.inc",
             here / "Makefile"]
    return {f: f.stat().st_mtime_ns for f in files}


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


@pytest.mark.parametrize("cpu", ["m7", "m4"])
def test_training_steps_on_cortex_m_are_bit_identical_to_host_tflm(tools, exported, cpu,
                                                                   tmp_path):
    info, images, labels = exported
    host = train_tflm(info.path, images, labels)
    sources = _library_sources()
    elf = cortex_m.build_firmware(info.path, tmp_path / "fw", cpu=cpu, arena_bytes=ARENA)
    again = cortex_m.build_library(cpu, kernels=cortex_m.model_kernels(info.path))
    # rebuilt only if a dgst source changed meanwhile (someone editing the tree)
    assert "building TFLM" not in again or _library_sources() != sources, \
        "an up-to-date library was rebuilt"
    flash = tmp_path / "flash.bin"
    device = cortex_m.run_firmware(elf, [images, labels.reshape(-1, 1)], cpu=cpu, flash=flash)
    assert f"dgst training firmware ({cpu}," in device.log

    names = info.manifest["outputs"]
    assert len(device.outputs) == len(host.result.outputs) == len(names)
    loss_ulps = np.abs(device.outputs[0].view(np.int32).astype(np.int64)
                       - host.result.outputs[0].view(np.int32)).max()
    for name, got, want in zip(names, device.outputs, host.result.outputs):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if cpu == "m4" and name == "loss":  # newlib's M4 logf: see the module doc
            assert loss_ulps <= 1, f"M4 loss {got[:, 0]} vs host {want[:, 0]}"
            continue
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
    # every operator of every step was profiled, and the operators are most of the step
    want = {op.removeprefix("CUSTOM:"): n * STEPS for op, n in info.manifest["ops"].items()}
    assert {op: n for op, (n, _) in device.ops.items()} == want
    in_ops = sum(count for _, count in device.ops.values())
    assert 0.5 * device.instructions.sum() < in_ops < device.instructions.sum()
    # the state committed to flash is host TFLM's after the last step
    loaded = cortex_m.run_firmware(elf, [images[:0], labels[:0].reshape(-1, 1)], cpu=cpu,
                                   flash=flash)
    assert loaded.loaded == {"slot": 0, "sequence": 1, "steps": STEPS}
    stored = cortex_m.state_params(loaded, info.manifest)
    assert len(stored) == len(info.manifest["params"])
    for entry in info.manifest["params"]:
        key = f"{entry['layer']}/{entry['param']}"
        np.testing.assert_array_equal(stored[key], host.result.outputs[entry["output"]][-1],
                                      err_msg=key)
    print(f"\n{cpu} {info.manifest.get('policy') or 'static'}: loss {loss_ulps} ULP from the "
          f"host's; arena_used_bytes "
          f"{device.arena_bytes} B, host {host.arena_bytes} B; instructions per step "
          f"{device.instructions.tolist()}; stack {device.stack_bytes} B")
    print((elf.parent / "size.txt").read_text())


def test_inference_model_runs_in_the_same_firmware_without_a_state(tools, exported,
                                                                  tmp_path):
    """The adapted inference model (builtin convolutions, no variable tensors): logits
    identical to host TFLM, every Invoke counted, and no flash store."""
    info, images, _ = exported
    path = write_inference_model(info.path, initial_params(info.path),
                                 tmp_path / "inference.tflite")
    host = run_inference_tflm(path, images)
    elf = cortex_m.build_firmware(path, tmp_path / "fw", arena_bytes=ARENA)
    flash = tmp_path / "flash.bin"
    run = cortex_m.run_firmware(elf, [images], flash=flash)
    np.testing.assert_array_equal(run.outputs[0].reshape(STEPS, -1),
                                  host.outputs[0].reshape(STEPS, -1))
    assert run.instructions.shape == (STEPS,) and (run.instructions > 0).all()
    assert "store none" in run.log and run.state_tensors == [] and run.commit is None
    assert not flash.exists()
    assert "CONV_2D" in run.ops and not any(op.endswith("_GRAD") for op in run.ops)


def test_linker_map_gives_flash_and_ram_by_part(tools, exported, tmp_path):
    """Firmware memory from the map: totals as the ELF's sections, parts that add up, the
    model and the arena at their exact sizes; over the budget only with QEMU's memory."""
    info, images, labels = exported
    elf = cortex_m.build_firmware(info.path, tmp_path / "fw", arena_bytes=ARENA)
    mem = linker_map.read_map(elf.parent / "firmware.map")
    sizes = dict((name, int(size)) for name, size, _ in
                 (line.split() for line in (elf.parent / "size.txt").read_text().splitlines()
                  if line.startswith(".")))
    assert mem.flash_bytes == sum(sizes.get(s, 0) for s in (
        ".isr_vector", ".text", ".rodata", ".ARM.exidx", ".ARM.extab", ".data"))
    assert mem.ram_bytes == sum(sizes.get(s, 0) for s in (".data", ".bss", ".heap", ".stack"))
    assert sum(mem.flash_parts.values()) == mem.flash_bytes
    assert sum(mem.ram_parts.values()) == mem.ram_bytes
    assert mem.flash_parts["model"] == info.path.stat().st_size
    assert mem.ram_parts["tensor arena"] == ARENA
    assert mem.ram_parts["stack"] == 32 * 1024 and mem.ram_parts["heap"] == 8 * 1024
    assert all(mem.flash_parts[p] > 1000 for p in ("TFLM", "dgst ops", "C/C++ runtime"))
    over = mem.over_budget()
    assert over == {"flash": mem.flash_bytes - 1024 * 1024, "ram": mem.ram_bytes - 320 * 1024}
    assert over["flash"] < 0 and over["ram"] < 0
    # an arena the STM32F746 cannot hold: ld refuses it, unless linked for QEMU's memory
    big = 320 * 1024
    with pytest.raises(cortex_m.FirmwareError, match="RAM' overflowed"):
        cortex_m.build_firmware(info.path, tmp_path / "big", arena_bytes=big)
    elf = cortex_m.build_firmware(info.path, tmp_path / "big", arena_bytes=big,
                                  fit_budget=False)
    mem_big = linker_map.read_map(elf.parent / "firmware.map")
    assert mem_big.ram_parts["tensor arena"] == big
    assert mem_big.over_budget()["ram"] == mem.over_budget()["ram"] + big - ARENA > 0
    run = cortex_m.run_firmware(elf, [images[:1], labels[:1].reshape(-1, 1)])
    assert run.instructions.shape == (1,)
    with pytest.raises(ValueError, match="not a GNU ld map"):
        linker_map.read_map(elf.parent / "size.txt")


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
    with pytest.raises(ValueError, match="contains whitespace"):
        cortex_m.build_firmware(info.path, tmp_path / "my fw")
    with pytest.raises(ValueError, match="loaded no state from flash"):
        cortex_m.state_params(cortex_m.FirmwareRun([], 0, np.zeros(0), 0, ""), info.manifest)
    source, header = cortex_m.embed_model(info.path, tmp_path / "fw")
    # the builtins the graph's operators use, not every operator code of the file
    assert "X(AddAdd) X(AddFullyConnected) X(AddMean)\n" in header.read_text()
    assert cortex_m.model_kernels(info.path) == ["add", "fully_connected", "reduce"]
    assert f"[{info.path.stat().st_size}]" in source.read_text()
