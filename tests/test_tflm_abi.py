"""The pip TFLM wheel's ABI, as the custom-op glue (tflm_ops/tflm/dgst_tflm_abi.h) assumes it.

These checks come before any kernel test: tests/test_tflm_ops.py runs `check_abi` in its
module fixture too, so no kernel runs on a wheel whose layout has changed.
"""
import pathlib
import shutil
import subprocess
import sys

import pytest

from dgst_tf.export.tflm import ops_loader as tflm_ops_loader
from dgst_tf.export.tflm.abi_check import (LAYOUT_FIELDS, check_abi, exported_symbols,
                                           undefined_tflm_symbols)

# The layout tflm_ops/tflm/dgst_tflm_abi.h declares (TFLMRegistration, resolver records).
DOCUMENTED_LAYOUT = {
    "registration_size": 56, "free": 8, "prepare": 16, "invoke": 24, "reset": 32,
    "builtin_code": 40, "custom_name": 48, "resolver_records": 8,
    "resolver_count": 8 + 200 * 56, "node_inputs": 0, "node_outputs": 8, "node_user_data": 24,
    "node_custom_initial_data": 40, "node_custom_initial_data_size": 48,
    "eval_tensor_dims": 8, "eval_tensor_type": 16,
}


@pytest.fixture(scope="module")
def runtime_so():
    return tflm_ops_loader.runtime_library_path()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    built = tflm_ops_loader.host_ops().library  # built with make if needed
    copy = tmp_path_factory.mktemp("abi") / built.name  # tflm_ops/build may be cleaned
    shutil.copy2(built, copy)
    return copy


def test_wheel_exports_the_functions_the_kernels_call(runtime_so):
    demangled = subprocess.run(["nm", "-D", "-C", "--defined-only", str(runtime_so)],
                               capture_output=True, text=True, check=True).stdout
    for signature in (
            "tflite::micro::GetEvalInput(tflite::micro::TfLiteContext const*, "
            "tflite::micro::TfLiteNode const*, int)",
            "tflite::micro::GetEvalOutput(tflite::micro::TfLiteContext const*, "
            "tflite::micro::TfLiteNode const*, int)",
            "tflite::micro::MicroContextAllocatePersistentBuffer(tflite::micro::TfLiteContext*, "
            "unsigned long)",
            "MicroPrintf(char const*, ...)",
            "tflite::micro::MicroMutableOpResolver<200u>::FindOp(char const*) const",
            "tflite::PythonOpsResolver::PythonOpsResolver()"):
        assert signature in demangled, f"{runtime_so} no longer exports {signature}"


def test_every_tflm_symbol_the_library_imports_is_exported(runtime_so, library):
    needed = undefined_tflm_symbols(library)
    assert "_ZN6tflite5micro12GetEvalInputEPKNS0_13TfLiteContextEPKNS0_10TfLiteNodeEi" in needed
    assert set(needed) <= exported_symbols(runtime_so)


def test_library_exports_only_the_registerers_and_the_layout_probe(library):
    exported = {name for name in exported_symbols(library) if not name.startswith("_")}
    assert exported == set(tflm_ops_loader.REGISTERERS) | {"DgstTflmAbiLayout"}


def test_layout_matches_the_wheel(library):
    report = check_abi(library)
    assert report["errors"] == []
    assert report["library_layout"] == DOCUMENTED_LAYOUT
    assert set(report["library_layout"]) == set(LAYOUT_FIELDS)
    # RegisterOp(init, prepare, invoke, free, reset) as compiled in the wheel
    assert report["wheel_registration_offsets"] == {"init": 0, "free": 8, "prepare": 16,
                                                    "invoke": 24, "reset": 32}
    # the wheel's FindOp found our record right after the interpreter's builtin ops
    builtins = report["builtin_ops_in_resolver"]
    assert 100 < builtins < 200
    assert report["find_op_offset"] == 8 + 56 * builtins


def test_registering_into_a_non_resolver_is_refused(library):
    code = ("import ctypes, sys; sys.path.insert(0, sys.argv[1]); import ops_loader as l; "
            "lib = l.load_library_global(sys.argv[2]); f = lib.DgstRegister_DGST_BIAS_GRAD; "
            "f.restype = ctypes.c_bool; print(f(ctypes.create_string_buffer(1 << 15)))")
    out = subprocess.run([sys.executable, "-c", code,
                          str(pathlib.Path(tflm_ops_loader.__file__).parent), str(library)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert "not a tflite::micro::MicroMutableOpResolver<200>" in out.stderr
