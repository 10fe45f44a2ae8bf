"""An exported training step on a simulated Cortex-M: TFLM built from source for the CPU
(``make tflm-cortex-m7``), a firmware holding the model in flash (``firmware/``), run in
``qemu-system-arm`` with the steps' inputs and outputs passed as semihosting files.

    from dgst_tf.tflm_ops import cortex_m

    elf = cortex_m.build_firmware("train.tflite", "build/fw")      # builds TFLM if missing
    run = cortex_m.run_firmware(elf, [images_q, labels])           # N steps = N Invokes
    run.outputs[0][:, 0], run.arena_bytes, run.instructions        # losses, arena, per step
    run.ops["DGST_CONV2D"]                # (invokes, instructions) per operator type
    again = cortex_m.run_firmware(elf, [x, y], flash="dev.flash")  # a device that persists
    again.loaded, again.commit            # state loaded at boot, committed after the steps
    m4 = cortex_m.build_firmware("train.tflite", "build/fw_m4", cpu="m4")  # mps2-an386
    ref = cortex_m.build_firmware("train.tflite", "build/fw_ref", cmsis_nn=False)

``python -m dgst_tf.tflm_ops.cortex_m embed MODEL DIR`` writes the firmware's model_data.cc
and model_ops.h (the Makefile's ``tflm-firmware`` target calls it). Needs make,
arm-none-eabi-gcc with newlib, qemu-system-arm and, unless ``tflm_dir`` is given, the pinned
TFLM archives (``TFLM_DEPS`` of tflm_ops/Makefile) or network access.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np

__all__ = ["CPUS", "FirmwareError", "FirmwareRun", "build_library", "build_firmware",
           "run_firmware", "state_params", "embed_model", "model_kernels", "model_ops"]

HERE = pathlib.Path(__file__).resolve().parent
# cpu -> QEMU machine (mps2-an500: Cortex-M7, mps2-an386: Cortex-M4)
CPUS = {"m7": "mps2-an500", "m4": "mps2-an386"}
# linker scripts: the STM32F746 budget (ld fails when the firmware does not fit), or QEMU's
# whole memory (to run and measure a firmware that does not fit)
LDSCRIPTS = {True: HERE / "mcu" / "stm32f746_budget.ld", False: HERE / "mcu" / "mps2_qemu.ld"}
QEMU_FLAGS = ["-nographic", "-semihosting", "-icount", "shift=6,align=off,sleep=off"]
# TfLiteType -> NumPy dtype (the types a training graph's outputs have)
_DTYPES = {1: np.float32, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 7: np.int16,
           9: np.int8}
# BuiltinOperator names whose MicroMutableOpResolver method is not their CamelCase
_ADD_METHODS = {"BATCH_MATMUL": "AddBatchMatMul",
                "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM"}

# BuiltinOperator -> TFLM kernel file (tensorflow/lite/micro/kernels/<file>.cc), for building
# only what a model needs (`TFLM_KERNELS`); a model with a builtin not listed gets them all.
KERNEL_FILES = {
    "ADD": "add", "SUB": "sub", "MUL": "mul", "FULLY_CONNECTED": "fully_connected",
    "MEAN": "reduce", "SUM": "reduce", "REDUCE_MAX": "reduce", "CONV_2D": "conv",
    "DEPTHWISE_CONV_2D": "depthwise_conv", "PAD": "pad", "PADV2": "pad",
    "SOFTMAX": "softmax", "RESHAPE": "reshape", "QUANTIZE": "quantize",
    "DEQUANTIZE": "dequantize", "AVERAGE_POOL_2D": "pooling", "MAX_POOL_2D": "pooling",
    "RELU": "activations", "RELU6": "activations", "CONCATENATION": "concatenation",
    "LOGISTIC": "logistic", "HARD_SWISH": "hard_swish", "STRIDED_SLICE": "strided_slice",
    "TRANSPOSE": "transpose", "SQUEEZE": "squeeze", "GATHER": "gather", "CAST": "cast"}


class FirmwareError(RuntimeError):
    """A build or a QEMU run of the firmware failed (the message holds the log's tail)."""


@dataclasses.dataclass
class FirmwareRun:
    """What the firmware reported: per-step outputs (``outputs[j]``: ``(steps, *dims)``, the
    model's output j after each Invoke), ``arena_used_bytes()``, instructions per Invoke,
    and the weight store (firmware/weight_store.h): the state tensors ((index, bytes) of
    each variable tensor), the state loaded at boot (``loaded``: slot, sequence, steps;
    ``loaded_state``: its bytes), the commit after the steps (slot, sequence, steps,
    erases, programs), or the flash write after which the power was cut."""

    outputs: list
    arena_bytes: int
    instructions: np.ndarray  # int64 [steps]
    stack_bytes: int
    log: str
    ops: dict = dataclasses.field(default_factory=dict)  # op name -> (invokes, instructions)
    state_tensors: list = dataclasses.field(default_factory=list)
    loaded: dict | None = None
    loaded_state: bytes | None = None
    commit: dict | None = None
    power_cut_after: int | None = None


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FirmwareError(f"{name} not found: apt-get install {package}")
    return path


@contextlib.contextmanager
def _lock(name: str):
    """One make at a time on the TFLM tree (``"tree"``: unpacking it) or on one library and
    its firmwares (``"library-m7"``, ...), across processes: the libraries of other CPUs
    build meanwhile (not tflm_ops/build/.lock, which guards the quick host build)."""
    folder = HERE.parent / "build" / "tflm"  # the Makefile's TFLM_BUILD
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".lock-{name}", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _make(*args: str, timeout: float, library: str) -> str:
    """``make -C tflm_ops args`` for ``library`` (its key: m7, m4, m7-ref, m4-ref), the tree
    made ready first."""
    _tool("make", "make")
    _tool("arm-none-eabi-gcc", "gcc-arm-none-eabi libnewlib-arm-none-eabi")
    tree = [a for a in args if a.startswith("TFLM_DIR=")]
    out = ""
    for target, lock in ((["tflm-tree", *tree], "tree"), (list(args), f"library-{library}")):
        with _lock(lock):
            proc = subprocess.run(["make", "-C", str(HERE), f"PYTHON={sys.executable}",
                                   *target], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise FirmwareError(f"make {' '.join(target)} failed ({proc.returncode}):\n"
                                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out += proc.stdout
    return out


def _cpu(cpu: str) -> str:
    if cpu not in CPUS:
        raise ValueError(f"cpu must be one of {sorted(CPUS)}, got {cpu!r}")
    return cpu


def _tflm_args(tflm_dir) -> list:
    return [f"TFLM_DIR={os.fspath(tflm_dir)}"] if tflm_dir else []


def build_library(cpu: str = "m7", tflm_dir=None, kernels=(),
                  timeout: float = 3600.0, *, cmsis_nn: bool = True) -> str:
    """``make tflm-cortex-<cpu>``: TFLM's microlite library with the dgst ops and CMSIS-NN
    (``cmsis_nn=False``: TFLM's reference kernels, ``tflm-cortex-<cpu>-ref``), all TFLM
    kernels or only the kernel files ``kernels`` (see `model_kernels`). Nothing is rebuilt
    when it is up to date. Returns make's output. Example::

        cortex_m.build_library("m7")      # about 6 minutes on 2 idle cores the first time
    """
    key = _cpu(cpu) + ("" if cmsis_nn else "-ref")
    return _make(f"tflm-cortex-{key}", *_tflm_args(tflm_dir),
                 f"TFLM_KERNELS={' '.join(kernels)}", timeout=timeout, library=key)


def model_kernels(model) -> list:
    """The TFLM kernel files a .tflite's builtins need, or [] (all) if one is not known."""
    builtins, _ = model_ops(pathlib.Path(model).read_bytes(), os.fspath(model))
    if any(b not in KERNEL_FILES for b in builtins):
        return []
    return sorted({KERNEL_FILES[b] for b in builtins})


def build_firmware(model, fw_dir, *, cpu: str = "m7", arena_bytes: int = 131072,
                   tflm_dir=None, timeout: float = 3600.0, cmsis_nn: bool = True,
                   fit_budget: bool = True, kernels=None) -> pathlib.Path:
    """Build the training firmware of ``model`` (an exported training .tflite, or any
    .tflite whose custom ops are dgst ops, e.g. an inference model) in ``fw_dir``, building
    the TFLM library first if it is missing (with the TFLM kernels the model's builtins
    need, `model_kernels`, or the kernel files ``kernels``: give the union of several
    models' to build their firmwares without rebuilding the library in between; CMSIS-NN
    or, ``cmsis_nn=False``, the reference kernels).
    ``fit_budget``: link against the STM32F746 budget (1 MB flash, 320 KB RAM; a firmware
    that does not fit fails to link), or, False, against QEMU's 4 MB + 4 MB so that it can
    run and `linker_map.read_map` says by how much it is over. Returns firmware.elf
    (size.txt and firmware.map beside it). Example::

        elf = cortex_m.build_firmware("train.tflite", "build/fw", arena_bytes=64 * 1024)
    """
    model = pathlib.Path(model).resolve()
    if not model.is_file():
        raise FileNotFoundError(f"build_firmware: no model file {model}")
    fw_dir = pathlib.Path(fw_dir).resolve()
    for what, path in (("model", model), ("fw_dir", fw_dir)):
        if any(c.isspace() for c in str(path)):
            raise ValueError(f"build_firmware: {what} {str(path)!r} contains whitespace, "
                             "which make cannot handle in file names")
    fw_dir.mkdir(parents=True, exist_ok=True)
    kernels = model_kernels(model) if kernels is None else sorted(kernels)
    build_library(cpu, tflm_dir, kernels, timeout, cmsis_nn=cmsis_nn)
    _make("tflm-firmware", f"CPU={cpu}", f"MODEL={model}", f"FW_DIR={fw_dir}",
          f"ARENA_BYTES={int(arena_bytes)}", f"TFLM_KERNELS={' '.join(kernels)}",
          f"TFLM_OPTIMIZED={'cmsis_nn' if cmsis_nn else 'none'}",
          f"FW_LDSCRIPT={LDSCRIPTS[bool(fit_budget)]}", *_tflm_args(tflm_dir),
          timeout=timeout, library=cpu + ("" if cmsis_nn else "-ref"))
    return fw_dir / "firmware.elf"


def run_firmware(elf, inputs, *, cpu: str = "m7", timeout: float = 600.0, flash=None,
                 power_cut=None) -> FirmwareRun:
    """Run ``elf`` in QEMU for ``len(inputs[0])`` Invokes; ``inputs[i][s]`` is model input i
    at step s (its exact bytes: int8 images, int32 labels). ``flash``: the file holding the
    device's flash region (read at boot, updated by the run: one run is one boot), None: a
    fresh erased flash. ``power_cut=(w, b)``: the power goes after flash write w of the run
    (b > 0: during it, after its first b bytes); the firmware then stops with
    ``power_cut_after`` set. Example::

        run = cortex_m.run_firmware(elf, [images_q, labels.reshape(-1, 1)])
        cut = cortex_m.run_firmware(elf, [images_q, labels], flash="f.bin", power_cut=(2, 0))
    """
    elf = pathlib.Path(elf).resolve()
    qemu = _tool("qemu-system-arm", "qemu-system-arm")
    arrays = [np.ascontiguousarray(a) for a in inputs]
    steps = len(arrays[0]) if arrays else 0
    if any(len(a) != steps for a in arrays):
        raise ValueError(f"run_firmware: inputs have {[len(a) for a in arrays]} steps; "
                         "every input needs one entry per step")
    if power_cut is not None and int(power_cut[0]) < 1:
        raise ValueError(f"run_firmware: power_cut=({power_cut[0]}, ...): flash writes are "
                         "numbered from 1")
    work = elf.parent / "run"
    work.mkdir(exist_ok=True)
    (work / "inputs.bin").write_bytes(b"".join(a[s].tobytes() for s in range(steps)
                                               for a in arrays))
    for name in ("outputs.bin", "state.bin", "flash.bin", "flash_fault.txt"):
        (work / name).unlink(missing_ok=True)
    if flash is not None and pathlib.Path(flash).exists():
        shutil.copyfile(flash, work / "flash.bin")
    if power_cut is not None:
        (work / "flash_fault.txt").write_text(f"{int(power_cut[0])} {int(power_cut[1])}\n")
    try:
        proc = subprocess.run([qemu, "-M", CPUS[_cpu(cpu)], *QEMU_FLAGS, "-kernel", str(elf)],
                              cwd=work, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise FirmwareError(f"{elf}: no exit from QEMU within {timeout} s") from e
    log = proc.stdout + proc.stderr
    cut = re.search(r"^power_cut after_write (\d+)$", log, re.M)
    if (proc.returncode != 0 or "\ndone" not in log) and not (power_cut and cut):
        raise FirmwareError(f"{elf} in qemu-system-arm -M {CPUS[cpu]} exited with "
                            f"{proc.returncode}:\n{log[-3000:]}")
    if flash is not None and (work / "flash.bin").exists():  # none: a model without state
        shutil.copyfile(work / "flash.bin", flash)
    run = _parse(log, (work / "outputs.bin").read_bytes(), steps, elf)
    run.power_cut_after = int(cut[1]) if cut else None
    if run.loaded is not None:
        run.loaded_state = (work / "state.bin").read_bytes()
    return run


def _parse(log: str, data: bytes, steps: int, elf) -> FirmwareRun:
    specs = [(int(m[1]), int(m[2]), int(m[3]), tuple(int(d) for d in m[4].split(",") if d))
             for m in re.finditer(r"^output (\d+) type (\d+) bytes (\d+) dims ([\d,]*)$", log,
                                  re.M)]
    per_step = sum(spec[2] for spec in specs)
    if len(data) != per_step * steps:
        raise FirmwareError(f"{elf}: outputs.bin has {len(data)} bytes, expected "
                            f"{steps} steps x {per_step}")
    outputs, offset = [], 0
    block = np.frombuffer(data, np.uint8).reshape(steps, per_step)
    for _, type_code, nbytes, dims in specs:
        if type_code not in _DTYPES:
            raise FirmwareError(f"{elf}: output of TfLiteType {type_code} is not supported")
        raw = np.ascontiguousarray(block[:, offset:offset + nbytes])
        outputs.append(raw.view(_DTYPES[type_code]).reshape(steps, *dims))
        offset += nbytes
    instructions = np.array([int(n) for n in re.findall(r"^step \d+ instructions (\d+)$",
                                                         log, re.M)], np.int64)
    arena = re.search(r"^arena_used_bytes (\d+)$", log, re.M)
    stack = re.search(r"^stack_bytes (\d+)$", log, re.M)
    ops = {m[1]: (int(m[2]), int(m[3])) for m in
           re.finditer(r"^op (\S+) invokes (\d+) instructions (\d+)$", log, re.M)}
    return FirmwareRun(outputs, int(arena[1]), instructions, int(stack[1]), log, ops,
                       [(int(m[1]), int(m[2])) for m in
                        re.finditer(r"^state_tensor (\d+) bytes (\d+)$", log, re.M)],
                       _fields(log, "store loaded", ("slot", "sequence", "steps")), None,
                       _fields(log, "store commit",
                               ("slot", "sequence", "steps", "erases", "programs")))


def state_params(run: FirmwareRun, manifest: dict) -> dict:
    """The trainable tensors of a training state the firmware loaded at boot
    (``run.loaded_state``, the variable tensors in ``run.state_tensors`` order), as
    ``{"layer/param": array}`` for the ``params`` of the model's manifest (for a weight kept
    in RAM as its kept channels, those channels: the shape of the manifest entry). Boot
    with no steps to read the committed state of a device. Example::

        after = cortex_m.run_firmware(elf, [images[:0], labels[:0]], flash="dev.flash")
        params = cortex_m.state_params(after, info.manifest)
    """
    if run.loaded_state is None:
        raise ValueError("state_params: the run loaded no state from flash (a fresh device, "
                         "or one without a flash file)")
    offsets, offset = {}, 0
    for index, nbytes in run.state_tensors:
        offsets[index] = (offset, nbytes)
        offset += nbytes
    params = {}
    for entry in manifest["params"]:
        key = f"{entry['layer']}/{entry['param']}"
        if entry["tensor"] not in offsets:
            raise ValueError(f"state_params: {key} (tensor {entry['tensor']}) is not a state "
                             "tensor of this firmware: another model's manifest?")
        start, nbytes = offsets[entry["tensor"]]
        value = np.frombuffer(run.loaded_state[start:start + nbytes], np.dtype(entry["dtype"]))
        if value.size != int(np.prod(entry["shape"])):
            raise ValueError(f"state_params: {key} has {nbytes} bytes in the state, the "
                             f"manifest says {entry['dtype']} {entry['shape']}")
        params[key] = value.reshape(entry["shape"]).copy()
    return params


def _fields(log: str, prefix: str, names: tuple) -> dict | None:
    """``{name: int}`` of the log line "<prefix> name1 v1 name2 v2 ...", or None."""
    pattern = prefix + "".join(rf" {name} (\d+)" for name in names)
    found = re.search(rf"^{pattern}$", log, re.M)
    return {name: int(found[i + 1]) for i, name in enumerate(names)} if found else None


def _add_method(name: str) -> str:
    """MicroMutableOpResolver method of a BuiltinOperator name (CONV_2D -> AddConv2D)."""
    if name in _ADD_METHODS:
        return _ADD_METHODS[name]
    return "Add" + "".join(t[0] + t[1:].lower() if t[0].isalpha() else t
                           for t in name.split("_"))


def model_ops(data: bytes, what: str = "model") -> tuple:
    """(builtin operator names, custom op names) of the operators of a .tflite flatbuffer
    (operator codes that no operator uses are left out: they would only cost flash)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(data, 0)
    used = {model.Subgraphs(g).Operators(o).OpcodeIndex()
            for g in range(model.SubgraphsLength())
            for o in range(model.Subgraphs(g).OperatorsLength())}
    builtins, customs = set(), set()
    for i in sorted(used):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            customs.add(code.CustomCode().decode())
        elif builtin in names:
            builtins.add(names[builtin])
        else:
            raise ValueError(f"{what}: unknown builtin operator code {builtin}")
    return sorted(builtins), sorted(customs)


def embed_model(model, out_dir) -> tuple:
    """Write ``out_dir``/model_data.cc (the .tflite as a 16-byte aligned array in flash) and
    model_ops.h (the resolver's builtins). Example::

        cortex_m.embed_model("train.tflite", "build/fw")
    """
    data = pathlib.Path(model).read_bytes()
    if data[4:8] != b"TFL3":
        raise ValueError(f"embed_model: {model} is not a .tflite file (no TFL3 identifier)")
    builtins, customs = model_ops(data, os.fspath(model))
    unknown = [c for c in customs if not c.startswith("DGST_")]
    if unknown:
        raise ValueError(f"embed_model: {model} uses custom ops {unknown}, which the firmware "
                         "does not register (only the DGST_* ops of dgst_train_ops.h)")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = ",\n".join(", ".join(f"0x{b:02x}" for b in data[i:i + 16])
                      for i in range(0, len(data), 16))
    source = out / "model_data.cc"
    source.write_text(f"// {pathlib.Path(model).name}: {len(data)} bytes (written by "
                      "dgst_tf.tflm_ops.cortex_m)\n"
                      'extern "C" {\nextern const unsigned char dgst_model_data[];\n'
                      f"alignas(16) const unsigned char dgst_model_data[{len(data)}] = {{\n"
                      f"{rows}}};\n}}\n")
    header = out / "model_ops.h"
    header.write_text(f"// The builtins of {pathlib.Path(model).name} (custom: "
                      f"{', '.join(customs) or 'none'})\n"
                      f"#define DGST_MODEL_BUILTIN_COUNT {len(builtins)}\n"
                      "#define DGST_MODEL_BUILTINS(X) "
                      + " ".join(f"X({_add_method(b)})" for b in builtins) + "\n")
    return source, header


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 3 or args[0] != "embed":
        print("usage: python -m dgst_tf.tflm_ops.cortex_m embed MODEL.tflite OUT_DIR",
              file=sys.stderr)
        return 2
    embed_model(args[1], args[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
