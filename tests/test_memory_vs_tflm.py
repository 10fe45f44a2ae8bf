"""The analytic memory model against TFLM's arena report of the graph `export_training`
really emits: MobileNetV2-0.35 with Lin et al.'s 49 KB scheme (tiny-training's published
``backward_config``) at 96x96, static and on-device (DGSU traversal) selection, firmware and
host graphs. The oracle is TFLM's ``print_allocations`` (`train_tflm`) and the exported file
itself (its ops and tensors); nothing is copied from a previous run.

128x128 exports take longer; the same comparison prints for any size with

    python tests/test_memory_vs_tflm.py 128 96
"""
import pathlib
import sys
import tempfile

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_memory import PUBLISHED  # noqa: E402  (tiny-training's published schemes)

from dgst_tf.core.bn_folding import fold_batchnorm  # noqa: E402
from dgst_tf.export.tflite_editor import ModelEditor  # noqa: E402
from dgst_tf.export.tflite_file import read_tflite  # noqa: E402
from dgst_tf.export.training import export_training, train_tflm  # noqa: E402
from dgst_tf.models import mobilenet_v2  # noqa: E402
from dgst_tf.planning import tflm_runtime  # noqa: E402
from dgst_tf.planning.memory import MemoryModel  # noqa: E402
from dgst_tf.planning.memory_report import compare_with_tflm  # noqa: E402
from dgst_tf.training.scheme import UpdateScheme  # noqa: E402

SIZE = 96
# (policy, output_params): static and DGSU firmware graphs, and the host graph (the default)
CASES = [(None, False), ("traversal", False), (None, True)]


def lin_49kb(size: int):
    """MobileNetV2-0.35 (random weights: memory does not depend on them), Lin's 49 KB
    scheme, calibration images."""
    model = fold_batchnorm(mobilenet_v2(0.35, (size, size, 3), classes=10, weights=None,
                                        seed=0))
    scheme = UpdateScheme.from_backward_config(model, *PUBLISHED[49])
    images = np.random.default_rng(0).uniform(-1, 1, (8, size, size, 3)).astype(np.float32)
    return model, scheme, images


def export_and_run(model, scheme, images, path, policy, outputs):
    """The exported step and one TFLM step of it."""
    info = export_training(model, scheme, images, path, learning_rate=0.001, num_samples=8,
                           policy=policy, output_params=outputs)
    return info, train_tflm(info.path, images[:1], np.array([3]))


@pytest.fixture(scope="module")
def mobilenet():
    return lin_49kb(SIZE)


@pytest.fixture(scope="module")
def exported(mobilenet, tmp_path_factory):
    """{(policy, output_params): (the export, its TFLM run)} for every case."""
    folder = tmp_path_factory.mktemp("memory_vs_tflm")
    return {(policy, outputs): export_and_run(*mobilenet, folder / f"{policy}_{outputs}.tflite",
                                              policy, outputs)
            for policy, outputs in CASES}


@pytest.mark.parametrize("policy, outputs", CASES)
def test_analytic_arena_is_within_5_percent_of_tflm(mobilenet, exported, policy, outputs):
    model, scheme, _ = mobilenet
    info, run = exported[policy, outputs]
    memory = MemoryModel(model, policy=policy, output_params=outputs)
    report = memory.report(scheme, dense=False)
    result = compare_with_tflm(report, run.arena_bytes, "arena")
    assert abs(result["ratio"] - 1) <= 0.05, result
    # the model describes the exported graph op for op and tensor for tensor
    timeline = memory.timeline(scheme)
    subgraph = ModelEditor(read_tflite(info.path)[1]).subgraph
    assert len(timeline.ops) == len(subgraph.operators)
    assert timeline.tensor_count == len(subgraph.tensors)
    kinds = [op.kind for op in timeline.ops]
    for kind in ("DGST_SELECT_CHANNELS", "DGST_FUSED_BLOCK", "DGST_SCATTER_CHANNELS",
                 "DGST_QUANTIZE_GRAD", "DGST_CONV2D"):
        assert kinds.count(kind) == info.ops.get(f"CUSTOM:{kind}", 0), kind
    # what TFLM plans (activations, gradients, scratch) at its busiest op: the head conv's
    # float output gradient (46 KB, never materialized) would show here
    assert tflm_runtime.planned_peak_bytes(timeline) == pytest.approx(
        run.result.arena_head_bytes, rel=0.01)
    # the variables: trainable tensors, selection state, step counter (16-byte aligned)
    variables = run.result.allocations["TfLiteTensor variable buffer data"]
    aligned = sum(-(-size // 16) * 16 for _, size, _ in timeline.variables if size)
    assert abs(variables - aligned) <= 16
    assert sum(size for _, size, _ in timeline.variables) == sum(timeline.persistent().values())


def main(sizes) -> None:
    """Print analytic vs TFLM arena for static / traversal firmware graphs at ``sizes``."""
    print("size  selection  graph     analytic KB  TFLM KB  difference")
    for size in sizes:
        model, scheme, images = lin_49kb(size)
        for policy, outputs in [(None, False), ("traversal", False)]:
            with tempfile.TemporaryDirectory() as folder:
                _, run = export_and_run(model, scheme, images,
                                        pathlib.Path(folder) / "step.tflite", policy, outputs)
            analytic = MemoryModel(model, policy=policy, output_params=outputs).arena_bytes(
                scheme)
            print(f"{size:4d}  {policy or 'static':9s}  firmware  {analytic / 1024:11.1f}  "
                  f"{run.arena_bytes / 1024:7.1f}  {100 * (analytic / run.arena_bytes - 1):+.2f}%")


if __name__ == "__main__":
    main([int(size) for size in sys.argv[1:]] or [128, 96])
