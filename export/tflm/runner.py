"""Run a `.tflite` model in the pip TFLite Micro interpreter, in a child process.

TFLM calls ``abort()`` on some models and trusts the flatbuffer it is given, so the model
is checked first (`read_tflite`: TFL3 identifier, schema parse, index ranges) and then run
in a fresh Python process (``export/tflm/_child.py``; no TensorFlow in it). A crash
becomes `TflmCrashError`, any other failure `TflmError`, both naming the model file::

    from dgst_tf.export.tflm.runner import run_tflm

    result = run_tflm("model.tflite", [image_int8])      # shape (1, H, W, C), int8
    result.outputs[0], result.arena_bytes                  # the arena really used

    # several invocations in one interpreter (state such as variable tensors persists):
    result = run_tflm("model.tflite", [images_int8])     # shape (N, 1, H, W, C)
    result.outputs[0].shape                                # (N, 1, classes)

Custom ops: pass the kernel ``libraries`` and the ``registerers`` to list in
``custom_op_registerers`` (see `dgst_tf.export.tflm.ops_loader.host_ops`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile

import numpy as np

from dgst_tf.export.tflite_file import (TensorDetails, TfliteFileError, read_tflite,
                                        tensor_details)

__all__ = ["run_tflm", "TflmResult", "TflmError", "TflmCrashError", "parse_allocations",
           "DEFAULT_ARENA_SIZE"]

CHILD = pathlib.Path(__file__).resolve().parent / "_child.py"
PHASE_MARK = "[dgst-tflm-child] phase: "
DEFAULT_ARENA_SIZE = 16 << 20  # host malloc; the bytes actually used are measured
SECONDS_PER_INVOKE = 2.0  # default time allowed per Invoke (hang guard, not a speed limit)


class TflmError(RuntimeError):
    """TFLM could not load or run a model (bad op, arena too small, registerer missing...)."""


class TflmCrashError(TflmError):
    """The TFLM child process died from a signal (abort(), segfault) or timed out."""


@dataclasses.dataclass
class TflmResult:
    """Outputs of one `run_tflm` call and the arena use reported by ``print_allocations``."""

    outputs: list  # one array per model output (stacked over invocations if asked)
    arena_bytes: int  # "Arena allocation total": what the model needs as tensor arena
    arena_head_bytes: int  # non-persistent part (activations, scratch)
    arena_tail_bytes: int  # persistent part (tensor structs, op data, variables)
    allocations: dict  # RecordingMicroAllocator category -> bytes used
    output_details: list  # TensorDetails of each output (scale, zero point, ...)
    log: str  # the child's stderr: TFLM's MicroPrintf output and the allocation report


_TOTAL = re.compile(r"Arena allocation (total|head|tail) (\d+) bytes")
_CATEGORY = re.compile(r"'([^']+)' used (\d+) bytes")


def parse_allocations(text: str) -> dict:
    """``{"total": n, "head": n, "tail": n, "categories": {name: bytes}}`` from the text
    that TFLM's ``print_allocations()`` writes to stderr (lines starting with
    ``[RecordingMicroAllocator]``). Missing figures are absent from the dict.

        parse_allocations("[RecordingMicroAllocator] Arena allocation total 5520 bytes")
        # {"total": 5520, "categories": {}}
    """
    found = {"categories": {}}
    for line in text.splitlines():
        if "[RecordingMicroAllocator]" not in line:
            continue
        match = _TOTAL.search(line)
        if match:
            found[match.group(1)] = int(match.group(2))
            continue
        match = _CATEGORY.search(line)
        if match:
            found["categories"][match.group(1)] = int(match.group(2))
    return found


def _stack_inputs(label, inputs, details: list[TensorDetails], invocations):
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    inputs = list(inputs)
    if len(inputs) != len(details):
        raise ValueError(f"TFLite model {label}: it has {len(details)} input(s) "
                         f"{[d.name for d in details]}, got {len(inputs)} array(s)")
    stacked, counts, extra_axis = [], set(), set()
    for k, (value, d) in enumerate(zip(inputs, details)):
        value = np.asarray(value)
        if value.dtype != d.dtype:
            raise TypeError(f"TFLite model {label}: input {k} ({d.name!r}) is "
                            f"{np.dtype(d.dtype).name}, got {value.dtype.name} values"
                            + (f" (quantize with scale {d.scale:g}, zero point "
                               f"{d.zero_point})" if d.scales else ""))
        if value.shape == d.shape:
            value = value[None]
            extra_axis.add(False)
        elif value.shape[1:] != d.shape:
            raise ValueError(f"TFLite model {label}: input {k} ({d.name!r}) has shape "
                             f"{d.shape}; got {value.shape} (pass that shape, or a stack of "
                             f"them for several invocations)")
        else:
            extra_axis.add(True)
        counts.add(value.shape[0])
        stacked.append(value)
    if len(counts) > 1 or len(extra_axis) > 1:
        raise ValueError(f"TFLite model {label}: the inputs must all be single examples "
                         f"or all stacks of the same length")
    count = counts.pop() if counts else (invocations or 1)
    if invocations is not None and invocations != count:
        raise ValueError(f"TFLite model {label}: invocations={invocations} but the inputs "
                         f"hold {count}")
    if count < 1:
        raise ValueError(f"TFLite model {label}: nothing to run (0 invocations)")
    stacked_result = extra_axis.pop() if extra_axis else invocations is not None
    return stacked, count, stacked_result


def _indices(values) -> list:
    return [] if values is None else [int(v) for v in values]  # numpy arrays: no `or []`


def _log_tail(log: str, lines: int = 25) -> str:
    kept = [line for line in log.splitlines() if not line.startswith(PHASE_MARK)]
    return "\n".join(kept[-lines:]) or "(TFLM printed nothing)"


def _arena_hint(log: str, error: str, arena_size: int) -> str:
    if "failed to allocate" in log.lower() and "registration" not in log.lower():
        return f" (arena_size was {arena_size} bytes; pass a larger arena_size)"
    return ""


def _custom_op_hint(log: str, model, registerers) -> str:
    if "registration from op code CUSTOM" not in log:
        return ""
    names = sorted({c.customCode.decode() for c in model.operatorCodes or []
                    if c.customCode is not None})
    return (f" (the model uses the custom ops {names}; registerers given: "
            f"{list(registerers)}; for the dgst ops pass the library and registerers of "
            f"dgst_tf.export.tflm.ops_loader.host_ops())")


def _last_phase(log: str) -> str:
    phases = [line[len(PHASE_MARK):] for line in log.splitlines()
              if line.startswith(PHASE_MARK)]
    return phases[-1] if phases else "starting the TFLM child process"


def run_tflm(model, inputs=(), *, libraries=(), registerers=(), arena_size: int | None = None,
             invocations: int | None = None, timeout: float | None = None) -> TflmResult:
    """Run ``model`` (a path or bytes) in the pip TFLM interpreter in a child process.

    ``inputs``: one array per model input, each of the input's exact shape and dtype, or a
    stack of them (one extra leading axis) to invoke the same interpreter several times;
    a single array is accepted for single-input models. ``invocations`` sets the count for
    models without inputs. ``libraries``/``registerers``: custom-op kernels (loaded with
    RTLD_GLOBAL) and registerer names. Outputs are stacked the same way as the inputs.
    ``timeout``: seconds before the child is taken for hung (default: 600 plus
    `SECONDS_PER_INVOKE` per invocation, so that evaluating thousands of images on a busy
    machine is not mistaken for a hang).

    Raises `TfliteFileError` for a missing/corrupt file, `TypeError`/`ValueError` for
    inputs that do not fit, `TflmCrashError` if TFLM kills the process, `TflmError` for any
    other TFLM failure. Example::

        result = run_tflm("model.tflite", [x_int8])
        print(result.outputs[0], result.arena_bytes)
    """
    label = "<bytes>" if isinstance(model, (bytes, bytearray, memoryview)) else os.fspath(model)
    data, parsed = read_tflite(model)
    subgraph = parsed.subgraphs[0]
    try:
        in_details = [tensor_details(parsed, int(i)) for i in _indices(subgraph.inputs)]
        out_details = [tensor_details(parsed, int(i)) for i in _indices(subgraph.outputs)]
    except ValueError as error:  # e.g. an int4 graph input: nothing NumPy can feed
        raise TfliteFileError(f"TFLite model {label}: {error}") from None
    stacked, count, stacked_result = _stack_inputs(label, inputs, in_details, invocations)
    arena_size = int(arena_size or max(DEFAULT_ARENA_SIZE, 10 * len(data)))
    if timeout is None:
        timeout = 600.0 + SECONDS_PER_INVOKE * count
    libraries = [str(pathlib.Path(lib).resolve()) for lib in libraries]
    for lib in libraries:
        if not os.path.isfile(lib):
            raise FileNotFoundError(f"run_tflm({label}): kernel library {lib} does not exist")

    with tempfile.TemporaryDirectory(prefix="dgst-tflm-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "model.tflite").write_bytes(data)  # exactly the bytes that were checked
        np.savez(tmp / "inputs.npz", **{f"input_{k}": v for k, v in enumerate(stacked)})
        request = {"model": str(tmp / "model.tflite"), "inputs": str(tmp / "inputs.npz"),
                   "outputs": str(tmp / "outputs.npz"), "status": str(tmp / "status.json"),
                   "libraries": libraries, "registerers": list(registerers),
                   "arena_size": arena_size, "invocations": count,
                   "num_inputs": len(in_details), "num_outputs": len(out_details)}
        (tmp / "request.json").write_text(json.dumps(request))
        env = dict(os.environ, PYTHONFAULTHANDLER="1")
        try:
            proc = subprocess.run([sys.executable, str(CHILD), str(tmp / "request.json")],
                                  capture_output=True, text=True, errors="replace",
                                  timeout=timeout, env=env)
        except subprocess.TimeoutExpired as error:
            log = error.stderr or ""
            log = log.decode(errors="replace") if isinstance(log, bytes) else log
            raise TflmCrashError(f"TFLM timed out after {timeout:g} s while "
                                 f"{_last_phase(log)} of model {label}; TFLM log:\n"
                                 f"{_log_tail(log)}") from None
        log = proc.stderr
        if proc.returncode < 0:
            try:
                name = signal.Signals(-proc.returncode).name
            except ValueError:
                name = f"signal {-proc.returncode}"
            hint = (" (TFLM calls abort() on degenerate models, e.g. a softmax input scale "
                    "near 0, or on a failed internal check)" if name == "SIGABRT" else "")
            hint += _arena_hint(log, "", arena_size)
            raise TflmCrashError(f"TFLM crashed with {name} while {_last_phase(log)} of model "
                                 f"{label}{hint}; TFLM log:\n{_log_tail(log)}")
        status_path = tmp / "status.json"
        if not status_path.is_file():
            raise TflmError(f"the TFLM child process for model {label} exited with code "
                            f"{proc.returncode} while {_last_phase(log)}; log:\n"
                            f"{_log_tail(log)}")
        status = json.loads(status_path.read_text())
        if not status["ok"]:
            hint = (_arena_hint(log, status["error"], arena_size)
                    + _custom_op_hint(log, parsed, registerers))
            raise TflmError(f"TFLM failed while {status['phase']} of model {label}: "
                            f"{status['error']}{hint}; TFLM log:\n{_log_tail(log)}")
        with np.load(tmp / "outputs.npz") as saved:
            outputs = [saved[f"output_{j}"] for j in range(len(out_details))]

    if not stacked_result:
        outputs = [o[0] for o in outputs]
    allocations = parse_allocations(log)
    if "total" not in allocations:
        raise TflmError(f"model {label}: print_allocations() reported no arena total; log:\n"
                        f"{_log_tail(log)}")
    clean_log = "\n".join(line for line in log.splitlines() if not line.startswith(PHASE_MARK))
    return TflmResult(outputs, allocations["total"], allocations.get("head", 0),
                      allocations.get("tail", 0), allocations["categories"], out_details,
                      clean_log)
