"""The training-kernel cores cross-built for Cortex-M7 and Cortex-M4 and run in QEMU
(mps2-an500 / mps2-an386) on test vectors from the NumPy reference (bit-exact checks in
the firmware). arm-none-eabi-gcc and qemu-system-arm are required: CI installs them, so a
missing tool fails these tests instead of skipping them.
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFLM_OPS = os.path.join(ROOT, "tflm_ops")
BUILD = os.path.join(TFLM_OPS, "build", "mcu")
QEMU_FLAGS = ["-nographic", "-semihosting", "-icount", "shift=6,align=off,sleep=off"]
LINE = re.compile(r"DGST case=(\S+) kernel=(\S+) instructions=(\d+) macs=(\d+) stack=(\d+) "
                  r"elements=(\d+) status=(\S+)")

from dgst_tf.tflm_ops import host as H  # noqa: E402  (test_kernels_mcu_real imports H)

GEN_VECTORS = [sys.executable, "-m", "dgst_tf.tflm_ops.mcu.gen_vectors"]
KERNELS = {"conv2d_weight_grad_s8", "conv2d_weight_grad_s8_ref", "depthwise_weight_grad_s8",
           "bias_grad_s8", "conv2d_input_grad_s8", "depthwise_input_grad_s8", "build_mask_s8",
           "apply_mask_f32", "quantize_grad_s8", "softmax_xent_grad", "sgd_qas_update_conv_s8",
           "sgd_qas_update_depthwise_s8", "sgd_qas_update_bias_s32",
           "sgd_qas_update_conv_sr_s8", "sgd_qas_update_depthwise_sr_s8"}


def require_tools():
    missing = [t for t in ("make", "arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: apt-get install gcc-arm-none-eabi "
                    "libnewlib-arm-none-eabi qemu-system-arm (CI installs them)")


@pytest.fixture(scope="module")
def firmware():
    """Build the M7, M4 and self-test firmware (one make, 2 jobs, under the build lock)."""
    require_tools()
    proc = H.make("-j2", "mcu", "mcu-m4", "mcu-selftest", f"PYTHON={sys.executable}")
    assert proc.returncode == 0, f"make failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def run_qemu(machine, elf):
    proc = subprocess.run(["qemu-system-arm", "-M", machine, *QEMU_FLAGS, "-kernel", elf],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def parse(output):
    return [dict(zip(("case", "kernel", "instructions", "macs", "stack", "elements", "status"),
                     m.groups())) for m in LINE.finditer(output)]


def n_checks():
    with open(os.path.join(BUILD, "vectors.h")) as f:
        text = f.read()
    return len(re.findall(r"^  check_\w+\(", text, flags=re.M))


@pytest.mark.parametrize("variant,machine", [("m7", "mps2-an500"), ("m4", "mps2-an386")])
def test_firmware_matches_reference_bit_exact(firmware, variant, machine):
    rc, out = run_qemu(machine, os.path.join(BUILD, variant, "firmware.elf"))
    assert f"cpu=cortex-{variant}" in out and "dsp=1" in out, out[:500]
    rows = parse(out)
    failed = [r for r in rows if r["status"] != "ok"]
    assert rc == 0, f"firmware exit status {rc}; failures: {failed}\n{out[-2000:]}"
    assert not failed
    assert len(rows) >= n_checks() > 40  # every generated check printed its result
    assert re.search(r"DGST summary cases=(\d+) failed=0 ", out)
    assert {r["kernel"] for r in rows} >= KERNELS
    # instruction counting works: a loop of exactly 20000 instructions
    loop = int(re.search(r"loop_instructions=(\d+)", out).group(1))
    assert abs(loop - 20000) <= 2
    by = {(r["case"], r["kernel"]): r for r in rows}
    for case in ("b3_expand_k4", "b3_expand_k16", "b15_expand_k14"):
        opt = int(by[case, "conv2d_weight_grad_s8"]["instructions"])
        ref = int(by[case, "conv2d_weight_grad_s8_ref"]["instructions"])
        macs = int(by[case, "conv2d_weight_grad_s8"]["macs"])
        assert 0 < opt < ref / 4, (case, opt, ref)
        assert opt / macs < 4.0, (case, opt / macs)
    # sparse update costs less: k = 4 of 16 kept vs dense
    assert (int(by["b3_expand_k4", "conv2d_weight_grad_s8"]["instructions"])
            < 0.3 * int(by["b3_expand_k16", "conv2d_weight_grad_s8"]["instructions"]))
    # depthwise weight gradients of maps larger than the sliding planes go strip by strip
    # (16x16: 6.4 instructions/MAC on the tap-by-tap path)
    for case in ("b3_dw_k24", "strip_dw_k5x3_k4"):
        row = by[case, "depthwise_weight_grad_s8"]
        assert int(row["instructions"]) / int(row["macs"]) < 4.0, row
    stacks = [int(r["stack"]) for r in rows]
    assert 0 < max(stacks) < 1024  # kernels use little stack


def test_firmware_fits_the_stm32f746_budget(firmware):
    """ld refuses what overflows the 1 MB / 320 KB regions; check the sections too."""
    for variant in ("m7", "m4"):
        assert os.path.getsize(os.path.join(BUILD, variant, "firmware.map")) > 0
        size = open(os.path.join(BUILD, variant, "size.txt")).read()
        sections = {m.group(1): int(m.group(2))
                    for m in re.finditer(r"^(\.\w+)\s+(\d+)\s+\d+", size, flags=re.M)}
        flash = sections[".isr_vector"] + sections[".text"] + sections[".rodata"] + sections.get(
            ".data", 0)
        ram = sections.get(".data", 0) + sections[".bss"] + sections[".heap"] + sections[".stack"]
        assert flash <= 1024 * 1024 and ram <= 320 * 1024, sections


def test_a_wrong_result_fails_the_firmware(firmware):
    """The self-test firmware checks two deliberately wrong expectations (a value and a
    hash): QEMU must exit with status 1 and print both failures."""
    rc, out = run_qemu("mps2-an500", os.path.join(BUILD, "m7-selftest", "firmware.elf"))
    rows = parse(out)
    assert rc == 1, out
    assert [r["status"] for r in rows] == ["ok", "FAIL", "FAIL"]
    assert "summary cases=3 failed=2" in out


def test_gen_vectors_takes_real_tensors_from_npz(tmp_path):
    """A .npz of real tensors replaces the random ones; wrong shapes are refused."""
    rng = np.random.default_rng(0)
    dy = rng.integers(-127, 128, (16, 16, 16)).astype(np.int8)
    dy[0, 0, :4] = [123, -45, 67, -89]
    logits = np.array([5, -7, 9, 11, -13, 15, 17, -19, 21, 23], np.int8)
    npz = tmp_path / "real.npz"
    np.savez(npz, **{"b3_project/dy": dy, "fc/logits": logits, "fc/label": np.int32(7)})
    out = tmp_path / "vectors.h"
    proc = subprocess.run(GEN_VECTORS + ["--npz", str(npz), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "123, -45, 67, -89" in text  # dy of the project conv is the real one
    assert "5, -7, 9, 11, -13, 15, 17, -19, 21, 23" in text
    assert re.search(r'check_softmax\("fc", \w+, 10, [^,]+, -3, 7,', text)
    np.savez(npz, **{"b3_project/dy": dy[:8]})
    proc = subprocess.run(GEN_VECTORS + ["--npz", str(npz), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "the layer needs (16, 16, 16)" in proc.stderr
