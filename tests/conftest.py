"""Shared test setup: few TensorFlow threads (2-core machines, pytest-xdist workers)."""
import os

# One TF thread per xdist worker, two when run serially; must precede TF's first op.
_threads = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
os.environ.setdefault("OMP_NUM_THREADS", _threads)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dgst_tf.core import runtime  # noqa: E402

runtime.limit_threads(int(_threads))
