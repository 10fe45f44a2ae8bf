"""A regular (non-editable) install: the wheel carries `dgst_tf.export` (from `export/`),
every subpackage, and the host custom-op library that `setup.py` builds with make."""
import glob
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)], capture_output=True, text=True, cwd=out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = glob.glob(str(out / "dgst_tf-*.whl"))
    return pathlib.Path(path)


def test_wheel_holds_the_exporter_subpackages_and_the_tflm_library(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("dgst_tf/export/__init__.py", "dgst_tf/export/inference.py",
                     "dgst_tf/pruning/__init__.py", "dgst_tf/data/__init__.py",
                     "dgst_tf/models/__init__.py", "dgst_tf/export/_lib/libdgst_tflm_ops.so",
                     "dgst_tf/core/__init__.py", "dgst_tf/training/__init__.py",
                     "dgst_tf/planning/__init__.py", "dgst_tf/jobs/__init__.py",
                     "dgst_tf/cli/__init__.py", "dgst_tf/export/tflm/runner.py",
                     "dgst_tf/export/tflm/_child.py", "dgst_tf/tflm_ops/reference.py"):
        assert expected in names, f"{expected} missing from {wheel.name}"
    assert not any(n.startswith("export/") for n in names), "export/ must install as dgst_tf.export"
    # every package of the source tree (a new subpackage must be listed in setup.cfg)
    for source, installed in (("dgst_tf", "dgst_tf"), ("export", "dgst_tf/export"),
                              ("tflm_ops", "dgst_tf/tflm_ops")):
        for init in (ROOT / source).rglob("__init__.py"):
            package = init.parent.relative_to(ROOT / source).as_posix()
            if "build" in package.split("/"):
                continue
            expected = f"{installed}/{package}/__init__.py".replace("/./", "/")
            assert expected in names, f"package {expected} missing from {wheel.name}"


def test_installed_copy_imports_outside_the_checkout_and_finds_its_library(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--target", str(site), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = ("import dgst_tf.export.tflm.ops_loader as l, dgst_tf.export.inference, "
              "dgst_tf.pruning, pathlib; "
              "print(pathlib.Path(l.__file__).parent); print(l.host_ops(build=False).library)")
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("DGST_TFLM_OPS_LIB", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package_dir, library = proc.stdout.split()[-2:]
    assert pathlib.Path(package_dir) == site / "dgst_tf" / "export" / "tflm"
    assert pathlib.Path(library) == site / "dgst_tf" / "export" / "_lib" / "libdgst_tflm_ops.so"
