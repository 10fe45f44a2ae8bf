"""Check that the pip TFLM wheel still has the ABI that ``tflm_ops/tflm/dgst_tflm_abi.h`` assumes.

Run before trusting any custom kernel in that interpreter (tests/test_tflm_abi.py does)::

    from dgst_tf.export.tflm.abi_check import check_abi
    report = check_abi()          # raises TflmAbiError naming the first mismatch

It checks, against the wheel's own machine code and symbol table:

- every TFLM symbol the kernel library imports is exported by ``_runtime.so`` (``nm -D``);
- the layout facts compiled into the library (``DgstTflmAbiLayout``) match the
  ``TFLMRegistration`` that the wheel's exported ``tflite::micro::RegisterOp`` writes;
- a real ``tflite::PythonOpsResolver`` (built with the wheel's exported constructor) accepts a
  dgst registerer, and the wheel's ``MicroMutableOpResolver<200>::FindOp`` finds the record at
  ``records_offset + 56 * index``, i.e. the record array, stride and count agree;
- the wheel's ``GetEvalInput``/``GetEvalOutput`` read ``TfLiteNode::inputs``/``outputs`` at
  the offsets the library uses (through a fake context whose callbacks record the index).

The ctypes part runs in a child process (``python abi_check.py LIBRARY``): a wrong
layout may crash it. This module imports only the standard library.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

__all__ = ["check_abi", "TflmAbiError", "undefined_tflm_symbols", "exported_symbols",
           "LAYOUT_FIELDS"]

LAYOUT_FIELDS = ("registration_size", "free", "prepare", "invoke", "reset", "builtin_code",
                 "custom_name", "resolver_records", "resolver_count", "node_inputs",
                 "node_outputs", "node_user_data", "node_custom_initial_data",
                 "node_custom_initial_data_size", "eval_tensor_dims", "eval_tensor_type")

# Mangled names of the wheel's functions used by the check itself.
_REGISTER_OP = ("_ZN6tflite5micro10RegisterOpEPFPvPNS0_13TfLiteContextEPKcmEPFNS0_12TfLiteStatus"
                "ES3_PNS0_10TfLiteNodeEESC_PFvS3_S1_ESE_")
_RESOLVER_CTOR = "_ZN6tflite17PythonOpsResolverC1Ev"
_FIND_OP_NAME = "_ZNK6tflite5micro22MicroMutableOpResolverILj200EE6FindOpEPKc"
_GET_EVAL_INPUT = "_ZN6tflite5micro12GetEvalInputEPKNS0_13TfLiteContextEPKNS0_10TfLiteNodeEi"
_GET_EVAL_OUTPUT = "_ZN6tflite5micro13GetEvalOutputEPKNS0_13TfLiteContextEPKNS0_10TfLiteNodeEi"


class TflmAbiError(RuntimeError):
    """The TFLM wheel's ABI differs from what the custom-op glue was written for."""


def _nm(path, *flags) -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        raise TflmAbiError("the ABI check needs `nm` (binutils: apt-get install -y binutils)")
    proc = subprocess.run([nm, "-D", *flags, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise TflmAbiError(f"nm -D {path} failed: {proc.stderr.strip()}")
    return proc.stdout.splitlines()


def exported_symbols(path) -> set:
    """Mangled names of the defined dynamic symbols of a shared library (``nm -D``)."""
    names = set()
    for line in _nm(path, "--defined-only"):
        parts = line.split()
        if len(parts) >= 3:
            names.add(parts[2].split("@")[0])
    return names


def undefined_tflm_symbols(library) -> list:
    """The library's undefined dynamic symbols in TFLM's namespace or MicroPrintf."""
    wanted = []
    for line in _nm(library, "--undefined-only"):
        name = line.split()[-1].split("@")[0]
        if name.startswith("_ZN6tflite") or "MicroPrintf" in name:
            wanted.append(name)
    return sorted(wanted)


def check_abi(library=None, timeout: float = 60.0) -> dict:
    """Run every check (module doc) against ``library`` (default: the built dgst library).

    Returns a report dict; raises `TflmAbiError` naming the first mismatch.
    """
    tflm_ops_loader = _loader()
    library = pathlib.Path(library) if library else tflm_ops_loader.host_ops().library
    runtime = tflm_ops_loader.runtime_library_path()
    exported = exported_symbols(runtime)
    needed = undefined_tflm_symbols(library)
    missing = [name for name in needed if name not in exported]
    if missing:
        raise TflmAbiError(f"{library} needs TFLM symbols that {runtime} does not export: "
                           f"{missing}")
    for name in (_REGISTER_OP, _RESOLVER_CTOR, _FIND_OP_NAME, _GET_EVAL_INPUT, _GET_EVAL_OUTPUT):
        if name not in exported:
            raise TflmAbiError(f"{runtime} no longer exports {name}: the ABI check (and "
                               f"probably the glue) must be revised for this wheel")
    proc = subprocess.run([sys.executable, __file__, str(library)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise TflmAbiError(f"the ctypes ABI probe of {library} against {runtime} failed "
                           f"(exit code {proc.returncode}):\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if report["errors"]:
        raise TflmAbiError(f"TFLM ABI mismatch between {library} and {runtime}: "
                           + "; ".join(report["errors"]))
    report["imported_tflm_symbols"] = needed
    return report


# ------------------------------------------------------------------ the child-side probe

def _loader():
    """The sibling ops_loader, as a package module or (in the probe child) a script's."""
    if __package__:
        return importlib.import_module(f"{__package__}.ops_loader")
    import ops_loader

    return ops_loader


def _probe(library: str) -> dict:
    tflm_ops_loader = _loader()

    errors, facts = [], {}
    handle = tflm_ops_loader.load_library_global(library)
    wheel = ctypes.CDLL(str(tflm_ops_loader.runtime_library_path()), mode=ctypes.RTLD_GLOBAL)

    # 1. Layout facts compiled into the library.
    layout = (ctypes.c_int64 * len(LAYOUT_FIELDS))()
    handle.DgstTflmAbiLayout(layout, ctypes.c_int32(len(LAYOUT_FIELDS)))
    ours = dict(zip(LAYOUT_FIELDS, layout))
    facts["library_layout"] = ours

    # 2. TFLMRegistration as the wheel's RegisterOp(init, prepare, invoke, free, reset) fills it.
    class Raw(ctypes.Structure):
        _fields_ = [("bytes", ctypes.c_uint8 * 64)]

    register_op = getattr(wheel, _REGISTER_OP)
    register_op.restype = Raw
    register_op.argtypes = [ctypes.c_void_p] * 5
    sentinels = {"init": 0x1111111111, "prepare": 0x2222222222, "invoke": 0x3333333333,
                 "free": 0x4444444444, "reset": 0x5555555555}
    raw = bytes(register_op(*(ctypes.c_void_p(sentinels[k]) for k in
                              ("init", "prepare", "invoke", "free", "reset"))).bytes)
    found = {}
    for name, value in sentinels.items():
        offset = raw.find(value.to_bytes(8, "little"))
        found[name] = offset
    facts["wheel_registration_offsets"] = found
    expected = {"init": 0, "free": ours["free"], "prepare": ours["prepare"],
                "invoke": ours["invoke"], "reset": ours["reset"]}
    for name, offset in expected.items():
        if found[name] != offset:
            errors.append(f"TFLMRegistration.{name} is at offset {found[name]} in the wheel, "
                          f"{offset} in the library")
    if ours["registration_size"] != 56 or ours["builtin_code"] != 40 or ours["custom_name"] != 48:
        errors.append(f"library TFLMRegistration layout {ours} is not the documented one")

    # 3. A real PythonOpsResolver: register a dgst op and let the wheel's FindOp find it.
    resolver = ctypes.create_string_buffer(1 << 16)  # larger than the object
    ctypes.memset(resolver, 0, len(resolver))
    getattr(wheel, _RESOLVER_CTOR)(resolver)
    count_at = ours["resolver_count"]
    count = ctypes.c_uint32.from_buffer(resolver, count_at)
    before = count.value
    facts["builtin_ops_in_resolver"] = before
    if not 0 < before < 200:
        errors.append(f"resolver count at offset {count_at} reads {before} after the wheel's "
                      f"PythonOpsResolver constructor (expected its builtin ops, < 200)")
    else:
        registerer = getattr(handle, "DgstRegister_DGST_BIAS_GRAD")
        registerer.restype = ctypes.c_bool
        registerer.argtypes = [ctypes.c_void_p]
        if not registerer(resolver):
            errors.append("DgstRegister_DGST_BIAS_GRAD refused the wheel's PythonOpsResolver")
        elif count.value != before + 1:
            errors.append(f"registering one op changed the count from {before} to {count.value}")
        else:
            registerer(resolver)  # a second registration is a no-op
            if count.value != before + 1:
                errors.append("registering the same op twice added a second record")
            find_op = getattr(wheel, _FIND_OP_NAME)
            find_op.restype = ctypes.c_void_p
            find_op.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            base = ctypes.addressof(resolver)
            at = find_op(resolver, b"DGST_BIAS_GRAD")
            want = base + ours["resolver_records"] + ours["registration_size"] * before
            facts["find_op_offset"] = None if at is None else at - base
            if at != want:
                errors.append(f"the wheel's FindOp found DGST_BIAS_GRAD at offset "
                              f"{None if at is None else at - base}, the library wrote it at "
                              f"{want - base}")
        if registerer(ctypes.create_string_buffer(16 * 1024)):  # zeroed: no vtable
            errors.append("the registerer accepted an object that is not a resolver")

    # 4. TfLiteNode inputs/outputs offsets as read by GetEvalInput/GetEvalOutput.
    callback_type = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    callback = callback_type(lambda self, index: 0x10000 + index)
    vtable = (ctypes.c_void_p * 32)(*([ctypes.cast(callback, ctypes.c_void_p).value] * 32))
    micro_context = (ctypes.c_void_p * 1)(ctypes.addressof(vtable))
    context = (ctypes.c_void_p * 8)(ctypes.addressof(micro_context))

    def int_array(*values):
        return (ctypes.c_int * (len(values) + 1))(len(values), *values)

    inputs, outputs = int_array(7, 8, -1), int_array(21, 22)
    node = (ctypes.c_uint8 * 64)()
    ctypes.c_void_p.from_buffer(node, ours["node_inputs"]).value = ctypes.addressof(inputs)
    ctypes.c_void_p.from_buffer(node, ours["node_outputs"]).value = ctypes.addressof(outputs)
    for name, index, want in ((_GET_EVAL_INPUT, 1, 0x10000 + 8), (_GET_EVAL_INPUT, 2, None),
                              (_GET_EVAL_OUTPUT, 1, 0x10000 + 22)):
        label = "GetEvalInput" if name == _GET_EVAL_INPUT else "GetEvalOutput"
        function = getattr(wheel, name)
        function.restype = ctypes.c_void_p
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        got = function(context, node, index)
        if got != want:
            errors.append(f"the wheel's {label}(node, {index}) returned {got}, "
                          f"expected {want}: TfLiteNode inputs/outputs offsets differ")
    facts["errors"] = errors
    return facts


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_probe(sys.argv[1])))
