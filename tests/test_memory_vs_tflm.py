"""The analytic memory model against TFLM's arena report of the graph `export_training`
really emits, on two graphs: MobileNetV2-0.35 with Lin et al.'s 49 KB scheme (tiny-training's
published ``backward_config``) at 96x96, static and on-device (DGSU traversal) selection,
firmware and host graphs; and a channel-pruned MobileNetV2 with the device pipeline's DGSU
scheme and export options (`dgst_tf.jobs.device_plan`: the firmware graph ``dgst device``
writes as deploy_train.tflite). The oracle is TFLM's ``print_allocations`` (`train_tflm`)
and the exported file itself (its ops, tensors and offline memory plan); nothing is copied
from a previous run.

128x128 exports take longer; the same comparison prints for any size with

    python tests/test_memory_vs_tflm.py 128 96

and `benchmarks/tflm_training_memory.py` measures both graphs at full size.

The same comparison holds on the CNN families users bring (`test_own_models`' tiny nets):
swish (EfficientNet-like: LOGISTIC + MUL, a sigmoid gate), hard-swish (MobileNetV3-like:
HARD_SWISH), both with a squeeze-and-excitation gate, and a ResNet-style net with a
projection shortcut; ``python tests/test_memory_vs_tflm.py families`` prints them.
"""
import pathlib
import sys
import tempfile

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_memory import PUBLISHED  # noqa: E402  (tiny-training's published schemes)
from test_own_models import FAMILIES, images  # noqa: E402  (the families' tiny nets)

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


def pruned_dgsu(size: int, width: float = 0.35, removed: float = 0.4, seed: int = 0):
    """A MobileNetV2 with a seeded ``removed`` fraction of its prunable channel groups
    removed (`dgst_tf.pruning.remove_channels`), BatchNorm folded, the device pipeline's
    DGSU scheme over its last 2 blocks at 2% of the conv weights (`dgsu_scheme`), and
    calibration images."""
    from dgst_tf.jobs.device_plan import dgsu_scheme
    from dgst_tf.pruning import DependencyGraph, remove_channels

    model = mobilenet_v2(width, (size, size, 3), classes=10, weights=None, seed=seed)
    groups = [g.index for g in DependencyGraph(model).groups()]
    rng = np.random.default_rng(seed)
    dropped = rng.choice(groups, int(removed * len(groups)), replace=False)
    model = fold_batchnorm(remove_channels(model, sorted(int(g) for g in dropped)))
    images = rng.uniform(-1, 1, (8, size, size, 3)).astype(np.float32)
    return model, dgsu_scheme(model, 2, 0.02, seed), images


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
    # what TFLM plans (activations, gradients, scratch): the export's offline plan with its
    # in-place ops and TFLM's own placement of the scratch buffers, byte for byte
    assert tflm_runtime.planned_peak_bytes(timeline) == run.result.arena_head_bytes
    # the variables: trainable tensors, selection state, step counter (16-byte aligned)
    variables = run.result.allocations["TfLiteTensor variable buffer data"]
    aligned = sum(-(-size // 16) * 16 for _, size, _ in timeline.variables if size)
    assert abs(variables - aligned) <= 16
    assert sum(size for _, size, _ in timeline.variables) == sum(timeline.persistent().values())


def test_pruned_dgsu_device_graph_is_within_5_percent(tmp_path):
    """The second graph: the firmware graph the device pipeline exports for a pruned
    MobileNetV2 (DGSU traversal selection on device, stochastic rounding)."""
    from dgst_tf.jobs.device_plan import device_export_options, export_deployable

    model, scheme, images = pruned_dgsu(64)
    path = export_deployable(model, scheme, images, tmp_path / "deploy_train.tflite",
                             num_samples=8, **device_export_options(0.001, 0))
    run = train_tflm(path, images[:2], np.array([3, 1]))
    memory = MemoryModel(model, policy="traversal", output_params=False)
    result = compare_with_tflm(memory.report(scheme, dense=False), run.arena_bytes, "arena")
    assert abs(result["ratio"] - 1) <= 0.05, result
    timeline = memory.timeline(scheme)
    subgraph = ModelEditor(read_tflite(path)[1]).subgraph
    assert len(timeline.ops) == len(subgraph.operators)
    assert tflm_runtime.planned_peak_bytes(timeline) == run.result.arena_head_bytes
    # the 32-bit structs are smaller; the tensors are the same bytes
    cortex_m = MemoryModel(model, policy="traversal", output_params=False,
                           tflm_target="cortex-m").arena_bytes(scheme)
    assert run.arena_bytes - 20 * 1024 < cortex_m < memory.arena_bytes(scheme)


# the swish, hard-swish, swish + hard-swish and residual nets; before the model knew the
# table activations' own ops (their int8 inputs kept for DGST_ACTIVATION_GRAD) and the
# converter's op order (a projection shortcut after the block beside it), it predicted
# 0.79x, 2.8x, 2.0x and 1.18x of TFLM's arena on them
FAMILY_NETS = ["efficientnet", "mobilenet_v3", "swish_se", "residual"]


def export_family(family: str, path):
    """A family's folded net, its scheme, and one TFLM step of the graph `export_training`
    emits for it (on-device DGST selection, as `test_own_models` trains it)."""
    build, spec, *_ = FAMILIES[family]
    model = fold_batchnorm(build())
    scheme = UpdateScheme(spec)
    x, y = images(17, seed=3)
    info = export_training(model, scheme, x[1:], path, learning_rate=0.05, policy="traversal")
    return model, scheme, info, train_tflm(info.path, x[:1], y[:1])


@pytest.mark.parametrize("family", FAMILY_NETS)
def test_family_arena_is_within_5_percent_of_tflm(family, tmp_path):
    model, scheme, info, run = export_family(family, tmp_path / "step.tflite")
    memory = MemoryModel(model, policy="traversal")
    result = compare_with_tflm(memory.report(scheme, dense=False), run.arena_bytes, "arena")
    assert abs(result["ratio"] - 1) <= 0.05, result
    # op for op in the exported order (LOGISTIC, MUL, HARD_SWISH, DGST_ACTIVATION_GRAD...),
    # tensor for tensor, and the planned tensors where TFLM puts them, byte for byte
    timeline = memory.timeline(scheme)
    editor = ModelEditor(read_tflite(info.path)[1])
    assert [op.kind for op in timeline.ops] == [editor.builtin(op).removeprefix("CUSTOM:")
                                                for op in editor.subgraph.operators]
    assert timeline.tensor_count == len(editor.subgraph.tensors)
    assert tflm_runtime.planned_peak_bytes(timeline) == run.result.arena_head_bytes


def families() -> None:
    """Print analytic vs TFLM arena for the families' nets (`FAMILY_NETS`)."""
    print("family        analytic B  TFLM B  ratio")
    for family in FAMILY_NETS:
        with tempfile.TemporaryDirectory() as folder:
            model, scheme, _, run = export_family(family, pathlib.Path(folder) / "step.tflite")
        analytic = MemoryModel(model, policy="traversal").arena_bytes(scheme)
        print(f"{family:12s}  {analytic:10d}  {run.arena_bytes:6d}  "
              f"{analytic / run.arena_bytes:.3f}")


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
    if sys.argv[1:] == ["families"]:
        families()
    else:
        main([int(size) for size in sys.argv[1:]] or [128, 96])
