"""Shared test setup: few TensorFlow threads (2-core machines, pytest-xdist workers)."""
import os

# One TF thread per xdist worker, two when run serially; must precede TF's first op.
_threads = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
os.environ.setdefault("OMP_NUM_THREADS", _threads)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's own CPU kernels refuse the gradient of a dilated convolution ("Current CPU
# implementations do not yet support dilation rates larger than 1"); its oneDNN kernels, on by
# default only on CPUs with AVX-512, compute it. Turn them on so the dilated-convolution oracles
# (tf.GradientTape) run on every x86 machine, not only on AVX-512 ones.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from dgst_tf.core import runtime  # noqa: E402

runtime.limit_threads(int(_threads))
