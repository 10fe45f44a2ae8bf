"""Packaging hook: build the TFLM custom-op library into the wheel.

All metadata is in setup.cfg. A regular `pip install .` runs `make -C tflm_ops/tflm` and
installs `libdgst_tflm_ops.so` as `dgst_tf/export/_lib/`, where
`dgst_tf.export.tflm.ops_loader` finds it. An editable install skips this: the loader builds
the library in `tflm_ops/build/host/` on first use. Set DGST_SKIP_TFLM_OPS=1 to skip it too
(a machine without g++; TFLM training then needs $DGST_TFLM_OPS_LIB).
"""
import os
import pathlib
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = pathlib.Path(__file__).resolve().parent
LIBRARY = "libdgst_tflm_ops.so"


class BuildPyWithTflmOps(build_py):
    """build_py, then the host custom-op library copied into the package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or os.environ.get("DGST_SKIP_TFLM_OPS"):
            return
        build = (ROOT / "build" / "tflm_ops_host").resolve()
        subprocess.check_call(["make", "-C", str(ROOT / "tflm_ops" / "tflm"), f"BUILD={build}"])
        target = pathlib.Path(self.build_lib) / "dgst_tf" / "export" / "_lib"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / LIBRARY, target / LIBRARY)


class BinaryDistribution(Distribution):
    """The wheel carries a native library: tag it for the platform, not py3-none-any."""

    def has_ext_modules(self):
        return not os.environ.get("DGST_SKIP_TFLM_OPS")


setup(cmdclass={"build_py": BuildPyWithTflmOps}, distclass=BinaryDistribution)
