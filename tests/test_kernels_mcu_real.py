"""One real training step on the MCU: the tail of the ImageNet-pretrained MobileNetV2-1.0
(classifier, head conv, block 16 project / depthwise / expand; real weights, saved
activations of a real image, the loss gradient flowing backward) exported by
dgst_tf.tflm_ops.real_vectors, turned into firmware vectors by dgst_tf.tflm_ops.mcu.gen_vectors,
run in QEMU on Cortex-M7 (mps2-an500) and Cortex-M4 (mps2-an386) and checked bit for bit against
reference.py. arm-none-eabi-gcc, qemu-system-arm and the offline ImageNet weights are
required (CI installs them): missing ones fail these tests.

The .npz (about 10 s of TensorFlow) is cached in the temporary directory, keyed by the
sources that make it; the firmware is built in its own build directory (not
tflm_ops/build/mcu, which the random-vector tests use).
"""
import fcntl
import hashlib
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from test_kernels_mcu import GEN_VECTORS, H, QEMU_FLAGS, parse, require_tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFLM_OPS = os.path.join(ROOT, "tflm_ops")
SOURCES = [os.path.join(TFLM_OPS, "real_vectors.py"), os.path.join(TFLM_OPS, "real_step.py"),
           os.path.join(TFLM_OPS, "reference.py"),
           os.path.join(ROOT, "dgst_tf", "core", "geometry.py"),
           os.path.join(ROOT, "dgst_tf", "models", "mobilenet_v2.py"),
           os.path.join(ROOT, "dgst_tf", "core", "bn_folding.py")]
pytestmark = pytest.mark.slow
LAYERS = ["classifier", "head_conv", "block_16_project", "block_16_depthwise", "block_16_expand"]
SIZE = 96


def _cache_path() -> str:
    h = hashlib.sha256()
    for path in SOURCES:
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(f"{SIZE} chelsea".encode())
    return os.path.join(tempfile.gettempdir(), "dgst-tf-real-step",
                        f"real_step_{h.hexdigest()[:16]}.npz")


@pytest.fixture(scope="module")
def real_npz():
    path = _cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:  # one export at a time (pytest-xdist workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            _export(path)
    return path


def _export(path):
    """python -m dgst_tf.tflm_ops.real_vectors (TensorFlow, one thread; about 10 s)."""
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
               OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "dgst_tf.tflm_ops.real_vectors", "--out", path,
                           "--image", "chelsea", "--image-size", str(SIZE)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"real_vectors.py failed:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def real_firmware(real_npz, tmp_path_factory):
    """M7 and M4 firmware on the real-step vectors (make BUILD=<tmp> NPZ=<npz>)."""
    require_tools()
    build = str(tmp_path_factory.mktemp("real_mcu_build"))
    proc = H.make("-j2", "mcu", "mcu-m4", f"BUILD={build}", f"NPZ={real_npz}",
                  f"PYTHON={sys.executable}")
    assert proc.returncode == 0, f"make failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return os.path.join(build, "mcu"), proc.stdout


def run_qemu(machine, elf):
    proc = subprocess.run(["qemu-system-arm", "-M", machine, *QEMU_FLAGS, "-kernel", elf],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_real_npz_is_the_pretrained_model(real_npz):
    """Real shapes and weights; the int8 chain follows TensorFlow's float gradient."""
    z = np.load(real_npz)
    assert [str(s) for s in z["meta/layers"]] == LAYERS
    assert z["block_16_project/w"].shape == (320, 1, 1, 960)
    assert z["block_16_depthwise/w"].shape == (1, 3, 3, 960)
    assert z["block_16_expand/x"].shape == (3, 3, 160)
    assert z["head_conv/w"].shape == (1280, 1, 1, 320)
    assert z["classifier/x"].shape == (1, 1, 1280) and z["meta/logits"].shape == (10,)
    for name in LAYERS:
        w = z[f"{name}/w"]
        assert np.abs(w.astype(np.int32)).max() == 127  # per-channel symmetric int8
        assert len(np.unique(w)) > 100  # real weights, not a constant
        assert float(z[f"info/cosine/{name}"]) > 0.8, name
    # the ReLU6 activations are real: many exact zeros, not all
    x = z["block_16_depthwise/x"]
    assert 0.05 < np.mean(x == -128) < 0.95


@pytest.mark.parametrize("variant,machine", [("m7", "mps2-an500"), ("m4", "mps2-an386")])
def test_real_step_runs_bit_exact_in_qemu(real_firmware, variant, machine):
    build, _ = real_firmware
    rc, out = run_qemu(machine, os.path.join(build, variant, "firmware.elf"))
    rows = parse(out)
    failed = [r for r in rows if r["status"] != "ok"]
    assert rc == 0, f"firmware exit status {rc}; failures: {failed}\n{out[-2000:]}"
    assert not failed and f"cpu=cortex-{variant}" in out
    assert re.search(r"DGST summary cases=(\d+) failed=0 ", out)
    with open(os.path.join(build, "vectors.h")) as f:
        text = f.read()
    assert "npz=" in text.splitlines()[0]
    calls = re.findall(r"^  check_\w+\(", text, flags=re.M)
    assert len(rows) >= len(calls) > 60
    by = {(r["case"], r["kernel"]): r for r in rows}
    # every layer of the step ran: gradients, updates, and the chain between the layers
    for name in LAYERS:
        assert (name, "bias_grad_s8") in by and (name, "sgd_qas_update_bias_s32") in by
        assert (name, "quantize_grad_s8") in by
    for name in LAYERS[1:]:
        if name != "block_16_project":
            assert (name, "build_mask_s8") in by and (name, "apply_mask_f32") in by
    assert ("block_16_project", "conv2d_input_grad_s8") in by
    assert ("block_16_depthwise", "depthwise_input_grad_s8") in by
    assert ("loss", "softmax_xent_grad") in by
    # real layer shapes: k = 2% of the input channels, MACs over the 3x3 feature map
    assert by["block_16_project_k19", "conv2d_weight_grad_s8"]["macs"] == str(9 * 19 * 320)
    assert by["block_16_expand_k3", "conv2d_weight_grad_s8"]["macs"] == str(9 * 3 * 960)
    assert by["block_16_depthwise_k19", "depthwise_weight_grad_s8"]["macs"] == str(931)
    assert by["block_16_project", "conv2d_input_grad_s8"]["macs"] == str(9 * 960 * 320)
    # sparse (2%) vs dense (all channels, in chunks that fit RAM) on the same layer
    dense = sum(int(r["instructions"]) for (c, k), r in by.items()
                if c.startswith("block_16_expand_k160_part") and k == "conv2d_weight_grad_s8")
    sparse = int(by["block_16_expand_k3", "conv2d_weight_grad_s8"]["instructions"])
    assert 0 < sparse < 0.05 * dense, (sparse, dense)
    assert max(int(r["stack"]) for r in rows) < 1024


def test_real_firmware_fits_the_stm32f746_budget(real_firmware):
    build, make_out = real_firmware
    usage = re.findall(r"^\s*(FLASH|RAM):\s+(\d+) B\s+(\d+) (KB|MB)", make_out, flags=re.M)
    assert len(usage) == 4, make_out[-2000:]  # M7 and M4
    for region, used, size, unit in usage:
        assert int(used) <= int(size) * (1024 if unit == "KB" else 1024 * 1024), usage
    for variant in ("m7", "m4"):
        size = open(os.path.join(build, variant, "size.txt")).read()
        sections = {m.group(1): int(m.group(2))
                    for m in re.finditer(r"^(\.\w+)\s+(\d+)\s+\d+", size, flags=re.M)}
        flash = sections[".isr_vector"] + sections[".text"] + sections[".rodata"] + sections.get(
            ".data", 0)
        ram = sections.get(".data", 0) + sections[".bss"] + sections[".heap"] + sections[".stack"]
        assert flash <= 1024 * 1024 and ram <= 320 * 1024, sections


def test_gen_vectors_reads_the_real_format_and_checks_it(real_npz, tmp_path):
    """--list prints the real layers; a wrong shape or a missing key is refused."""
    proc = subprocess.run(GEN_VECTORS + ["--npz", real_npz, "--list"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == LAYERS
    z = dict(np.load(real_npz))
    bad = tmp_path / "bad.npz"
    z["block_16_depthwise/y"] = z["block_16_depthwise/y"][:2]
    np.savez(bad, **z)
    proc = subprocess.run(GEN_VECTORS + ["--npz", str(bad), "--out",
                                         str(tmp_path / "v.h")], capture_output=True, text=True)
    assert proc.returncode != 0 and "block_16_depthwise/y: shape (2, 3, 960)" in proc.stderr
    del z["block_16_depthwise/y"]
    np.savez(bad, **z)
    proc = subprocess.run(GEN_VECTORS + ["--npz", str(bad), "--out",
                                         str(tmp_path / "v.h")], capture_output=True, text=True)
    assert proc.returncode != 0 and "missing keys ['y']" in proc.stderr
