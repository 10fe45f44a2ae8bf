"""Generate build/mcu/vectors.h: test vectors of the training kernels for the MCU harness.

    python -m dgst_tf.tflm_ops.mcu.gen_vectors --out build/mcu/vectors.h [--seed 0]
    python -m dgst_tf.tflm_ops.mcu.gen_vectors --npz real.npz --out vectors.h
    python -m dgst_tf.tflm_ops.mcu.gen_vectors --npz real.npz --list

The expected outputs come from the NumPy reference (`dgst_tf.tflm_ops.reference`), the one
oracle of the C kernels. By default the synthetic cases of `mcu.synthetic_vectors` on random
tensors (``--seed``); ``--npz FILE`` replaces any of those tensors with real ones (keys
``<layer>/<field>``, shapes printed by ``--list``). An .npz in the `real_step` format
(``meta/format`` = "dgst-real-step-1", written by ``python -m dgst_tf.tflm_ops.real_vectors``
from a real model) replaces all of them by the cases of that model's training step
(`mcu.real_cases`).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from dgst_tf.core.files import write_atomically
from dgst_tf.tflm_ops import real_step
from dgst_tf.tflm_ops.mcu import real_cases, synthetic_vectors
from dgst_tf.tflm_ops.mcu.c_emitter import render

HERE = os.path.dirname(os.path.abspath(__file__))


def list_layers(arrays: dict):
    """Print the layers the vectors use and their shapes."""
    if real_step.is_real_step(arrays):
        for L in real_step.read_layers(arrays):
            print(L["name"], L["kind"], L["g"], {"x": L["x"].shape, "w": L["w"].shape,
                                                 "y": L["y"].shape, "relu6": L["relu6"]})
        return
    for name, (kind, g, c_in, c_out) in synthetic_vectors.LAYERS.items():
        print(name, kind, g, {k: v for k, v in synthetic_vectors.shapes(name).items()})


def build(arrays: dict, seed: int):
    """(emitter, the keys of ``arrays`` that were read)."""
    if real_step.is_real_step(arrays):
        used = set()
        return real_cases.build(arrays, used), used
    tensors = synthetic_vectors.Tensors(seed, arrays)
    return synthetic_vectors.build(tensors), tensors.used


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "..", "build", "mcu", "vectors.h"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--npz", help="real tensors (<layer>/<field> keys) replacing random ones")
    p.add_argument("--list", action="store_true", help="print the layers and their shapes")
    args = p.parse_args(argv)
    arrays = dict(np.load(args.npz)) if args.npz else {}
    if args.list:
        list_layers(arrays)
        return 0
    emitter, used = build(arrays, args.seed)
    for item in emitter.host_only:
        print(f"gen_vectors: host only: {item}")
    unused = sorted(set(arrays) - used - {k for k in arrays
                                          if "/kept" in k or k.startswith("info/")})
    if unused:
        print(f"gen_vectors: warning: unused keys in {args.npz}: {unused}", file=sys.stderr)
    text = render(emitter, f"npz={args.npz}" if args.npz else f"random, seed {args.seed}")
    write_atomically(args.out, text, make_parents=True)
    print(f"gen_vectors: {len(emitter.calls)} cases, {len(text) / 1e6:.1f} MB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
