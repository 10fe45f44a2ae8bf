"""Build (if needed), find and load the dgst custom-op library for the pip TFLM interpreter.

The library (``libdgst_tflm_ops.so``, built from ``tflm_ops/core`` and ``tflm_ops/tflm``)
links nothing from TFLM: its TFLM symbols come from the wheel's ``_runtime.so``, which is
therefore loaded with ``RTLD_GLOBAL`` first. The interpreter then finds each op's
``extern "C" bool DgstRegister_<OP>(void* resolver)`` by ``dlsym`` when the name is listed in
``custom_op_registerers``. Usually `dgst_tf.export.tflm.runner.run_tflm` does all of this in a
child process::

    from dgst_tf.export.tflm import ops_loader
    ops = ops_loader.host_ops()       # builds with make if the sources changed
    run_tflm("grad.tflite", [dy], libraries=[ops.library], registerers=ops.registerers)

    # or, in a process that runs TFLM itself (no TensorFlow in it, TFLM may abort()):
    names = ops_loader.load_into_process(ops.library)
    interpreter = runtime.Interpreter.from_bytes(data, custom_op_registerers=names)

Library lookup order: ``$DGST_TFLM_OPS_LIB``; a library installed inside the package
(``dgst_tf/export/_lib/libdgst_tflm_ops.so``, written by a packaging build step); the source
tree's ``tflm_ops/build/host/libdgst_tflm_ops.so``, rebuilt with ``make`` when its sources
are newer. This module imports only the standard library, so the TFLM child process can load
it without TensorFlow.
"""
from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import importlib.util
import os
import pathlib
import shutil
import subprocess

__all__ = ["OPS", "REGISTERERS", "HostOps", "TflmOpsBuildError", "host_ops",
           "build_host_library", "host_library_path", "runtime_library_path",
           "load_into_process", "load_library_global", "registerer_name"]

# The custom ops of the library, one per tflm_ops/tflm/dgst_<op>.cc (documented there and in
# tflm_ops/tflm/README.md). tests/test_tflm_abi.py checks this list against the library.
OPS = ("DGST_BIAS_GRAD", "DGST_CONV2D_WEIGHT_GRAD", "DGST_VARIABLE_INIT",
       "DGST_SGD_QAS_UPDATE", "DGST_CONV2D_INPUT_GRAD", "DGST_DEPTHWISE_INPUT_GRAD",
       "DGST_DEPTHWISE_WEIGHT_GRAD", "DGST_SOFTMAX_XENT_GRAD", "DGST_QUANTIZE_GRAD",
       "DGST_RELU_MASK", "DGST_GATHER_CHANNELS", "DGST_SELECT_CHANNELS",
       "DGST_FUSED_BLOCK", "DGST_SCATTER_CHANNELS", "DGST_CONV2D",
       "DGST_ACTIVATION_GRAD")
LIBRARY_NAME = "libdgst_tflm_ops.so"
ENV_LIBRARY = "DGST_TFLM_OPS_LIB"


def registerer_name(op: str) -> str:
    """The registerer symbol of custom op ``op``: ``DgstRegister_<op>``."""
    return f"DgstRegister_{op}"


REGISTERERS = tuple(registerer_name(op) for op in OPS)


class TflmOpsBuildError(RuntimeError):
    """The host custom-op library could not be found, built or loaded."""


@dataclasses.dataclass(frozen=True)
class HostOps:
    """The host custom-op library and the registerer names to pass to the interpreter."""

    library: pathlib.Path
    registerers: tuple = REGISTERERS
    ops: tuple = OPS


def _package_dir() -> pathlib.Path:
    """The installed ``dgst_tf/export`` folder (this module lives in its ``tflm/``)."""
    return pathlib.Path(__file__).resolve().parent.parent


def source_dir() -> pathlib.Path | None:
    """``tflm_ops/`` of a source checkout (editable install), or None."""
    candidate = _package_dir().parent / "tflm_ops"
    return candidate if (candidate / "tflm" / "Makefile").is_file() else None


def host_library_path() -> pathlib.Path | None:
    """Where the library is or would be built, following the lookup order (module doc)."""
    env = os.environ.get(ENV_LIBRARY)
    if env:
        return pathlib.Path(env)
    installed = _package_dir() / "_lib" / LIBRARY_NAME
    if installed.is_file():
        return installed
    src = source_dir()
    return src / "build" / "host" / LIBRARY_NAME if src is not None else None


def build_host_library(quiet: bool = True) -> pathlib.Path:
    """Run ``make -C tflm_ops/tflm`` (a no-op when up to date) and return the library path.

    Serialized with a file lock, so parallel test workers do not build over each other.
    Raises `TflmOpsBuildError` with the compiler output on failure. Example::

        lib = build_host_library()
    """
    src = source_dir()
    if src is None:
        raise TflmOpsBuildError(
            f"cannot build {LIBRARY_NAME}: no tflm_ops/ source folder next to {_package_dir()}"
            f" (not a source checkout); set ${ENV_LIBRARY} to a built library")
    make = shutil.which("make")
    if make is None or not (shutil.which("g++") or os.environ.get("CXX")):
        raise TflmOpsBuildError(f"cannot build {LIBRARY_NAME}: needs make and g++ "
                                f"(apt-get install -y build-essential)")
    build = src / "build" / "host"
    build.mkdir(parents=True, exist_ok=True)
    with open(build / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run([make, "-C", str(src / "tflm"), f"BUILD={build}"],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise TflmOpsBuildError(f"building {build / LIBRARY_NAME} failed (make -C "
                                f"{src / 'tflm'}):\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    if not quiet:
        print(proc.stdout, end="")
    return build / LIBRARY_NAME


def host_ops(build: bool = True) -> HostOps:
    """The library (built if needed when ``build``) and its registerer names.

        ops = host_ops()
        ops.library, ops.registerers   # Path, ("DgstRegister_DGST_BIAS_GRAD", ...)
    """
    path = host_library_path()
    src = source_dir()
    if build and not os.environ.get(ENV_LIBRARY) and src is not None and (
            path is None or path.parent == src / "build" / "host"):
        path = build_host_library()
    if path is None or not path.is_file():
        raise TflmOpsBuildError(f"custom-op library {path or LIBRARY_NAME} not found; build it "
                                f"with `make -C tflm_ops/tflm` or set ${ENV_LIBRARY}")
    return HostOps(path)


def runtime_library_path() -> pathlib.Path:
    """The pip TFLM interpreter's ``_runtime.so``, located without importing tflite_micro."""
    spec = importlib.util.find_spec("tflite_micro")
    if spec is None or not spec.submodule_search_locations:
        raise TflmOpsBuildError("tflite_micro is not installed "
                                "(pip install tflite-micro==0.dev20261023182759)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0], "python", "tflite_micro",
                        "_runtime.so")
    if not path.is_file():
        raise TflmOpsBuildError(f"the tflite_micro wheel has no {path}")
    return path


def load_into_process(library=None) -> tuple:
    """Load ``_runtime.so`` and ``library`` with RTLD_GLOBAL; return the registerer names.

    Call it before the interpreter is built. Only for a process that may run TFLM (it can
    abort()); `run_tflm` calls it in its child process. Example::

        names = load_into_process(host_ops().library)
    """
    library = pathlib.Path(library) if library is not None else host_ops().library
    handle = load_library_global(library)
    missing = [name for name in REGISTERERS if not hasattr(handle, name)]
    if missing:
        raise TflmOpsBuildError(f"custom-op library {library} lacks the registerers {missing}")
    return REGISTERERS


def load_library_global(library) -> ctypes.CDLL:
    """Load the TFLM ``_runtime.so``, then any kernel ``library``, both with RTLD_GLOBAL
    (the kernels' TFLM symbols resolve against the first). Example::

        handle = load_library_global("libmy_kernels.so")
    """
    ctypes.CDLL(str(runtime_library_path()), mode=ctypes.RTLD_GLOBAL)
    try:
        return ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        raise TflmOpsBuildError(f"cannot load custom-op library {library}: {error}") from None
