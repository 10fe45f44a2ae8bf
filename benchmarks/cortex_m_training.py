"""The training step of real models on a simulated Cortex-M7 / M4 through TFLM built from
source, against the host pip TFLM: bit-identity, memory, instruction counts.

    python benchmarks/cortex_m_training.py --pipeline-dir device_run       # ~1 h on 2 cores
    python benchmarks/cortex_m_training.py --skip-mobilenet --cpus m7 --no-reference \
        --pipeline-model device_run/deploy_train.tflite --name cortex_m_training_pipeline
    python benchmarks/cortex_m_training.py --skip-pipeline --cases static "DGSU traversal" \
        --inferences 20      # the stored results, M7 + M4, CMSIS-NN + reference: ~50 min
    python benchmarks/cortex_m_training.py --skip-pipeline --cases "static, builtin convs" \
        --cpus m7 --name cortex_m_training_builtin_convs   # TFLM's convs in the forward pass
    python benchmarks/cortex_m_training.py --steps 2 --skip-pipeline --cpus m7 --name smoke

Each row records ``cores``, a digest of the dgst C sources its firmware was built from
(`cores_digest`): rows with different digests ran different kernel code.

Models: (1) MobileNetV2 width 0.35 at 128x128, 10 classes, random init (memory and
instruction counts do not depend on the weights; no ImageNet weights of width 0.35 are
reachable offline), with tiny-training's 49 KB scheme (Lin et al. 2022; `LIN_49KB` of
tflm_training_memory.py), exported by `export_training` with its defaults (PADs folded,
frozen blocks fused, requantization in flash): static channel selection and on-device DGSU
traversal selection; and the static scheme with builtin convolutions
(``requant_in_flash=False``), whose forward pass runs TFLM's CONV_2D / DEPTHWISE_CONV_2D
kernels. CIFAR-10 training images. (2) The pruned ImageNet MobileNetV2 of the device
pipeline, read from the output folder of an earlier ``dgst device`` run (this script does
not run the pipeline): ``--pipeline-dir`` needs ``deploy_train.tflite``, its
``check_start.tflite`` with parameter outputs, ``adapted.tflite`` and ``prune.stage.json``
(dataset, image size and preprocessing); ``--pipeline-model`` takes the
``deploy_train.tflite`` alone (with ``prune.stage.json`` beside it) and adds the other
two's rows when they are beside it. ``--skip-pipeline`` leaves this model out.

For each training graph: the firmware graph (``output_params=False``, loss + logits + kept
channels out) runs N steps in ``qemu-system-arm`` (M7: ``-M mps2-an500``, M4: ``-M
mps2-an386``) and must equal host TFLM (`train_tflm`) at every step; the state the firmware
committed to flash (read back by a second boot) must equal host TFLM's trainable tensors
after step N; the graph with parameter outputs must equal host TFLM in every trainable
tensor at every step (M7). The adapted inference model (the trained weights) runs on the
M7 for the per-inference count, logits identical to host TFLM, and accuracy.

Figures: ``arena_used_bytes()`` on the 32-bit target next to the 64-bit host's; flash and
RAM of the whole firmware from its linker map (firmware rebuilt with the arena at the
device's own figure) against the STM32F746 (1 MB flash, 320 KB SRAM), with what does not fit
and by how much; QEMU ``-icount`` instructions per training step (step 0 also copies the
initial weights: reported apart) and per inference, split into forward operators and the
training operators; CMSIS-NN against TFLM's reference kernels (M7); and TinyEngine's
published figure beside ours: 373 ms per training step of MobileNetV2-w0.35 128x128 on an
STM32F746 at 216 MHz (about 80.6 M cycles; their TF-Lite-Micro-kernel baseline 3448 ms,
about 745 M cycles). QEMU counts instructions, not cycles: it models no pipeline, caches or
flash wait states, so the ratio is indicative only.

Writes benchmarks/results/<name>.{json,md} (default ``cortex_m_training``) and, when the
M7 ran with both kernel sets, <name>_kernels.{json,md}: CMSIS-NN and reference kernels side
by side (`kernel_comparison`).
"""
import argparse
import hashlib
import json
import pathlib
import re
import tempfile
import types

import numpy as np

import _report
from tflm_training_memory import LIN_49KB

from dgst_tf import data, models
from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.export.training import (export_training, load_manifest, run_inference_tflm,
                                     train_tflm, write_inference_model)
from dgst_tf.planning.memory import KB
from dgst_tf.tflm_ops import cortex_m
from dgst_tf.tflm_ops.mcu import linker_map
from dgst_tf.training.scheme import UpdateScheme

# Lin et al. 2022, Table/Fig. "training latency": MobileNetV2-w0.35 128x128, STM32F746
TINYENGINE_MS, TFLM_BASELINE_MS, STM32F746_MHZ = 373, 3448, 216
TINYENGINE_CYCLES = TINYENGINE_MS * 1e-3 * STM32F746_MHZ * 1e6
# operator types of the forward pass (the rest: gradients, updates, selection, init)
FORWARD_OPS = {"DGST_FUSED_BLOCK", "DGST_CONV2D", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD",
               "MEAN", "FULLY_CONNECTED", "PAD", "RESHAPE", "AVERAGE_POOL_2D", "SOFTMAX"}


# export_training options of the MobileNetV2 graphs (--cases)
MOBILENET_CASES = {"static": {}, "DGSU traversal": {"policy": "traversal"},
                   "static, builtin convs": {"requant_in_flash": False}}


def cores_digest() -> str:
    """SHA-256 (12 hex digits) of the dgst sources compiled into the firmware (the C cores
    and their TFLM kernels): rows with different digests ran different kernel code."""
    here = pathlib.Path(cortex_m.__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*here.glob("core/*.[ch]"), *here.glob("tflm/*.cc"),
                        *here.glob("tflm/*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _kb(n):
    return round(n / KB, 1)


def quantized(images, spec) -> np.ndarray:
    """Float images -> the int8 codes of the model input, one step per entry."""
    codes = np.round(np.asarray(images, np.float32) / np.float32(spec["scale"]))
    return np.clip(codes + spec["zero_point"], -128, 127).astype(np.int8)[:, None]


def _build(model, fw_dir, arena, **kwargs):
    """(elf, fits the STM32F746): linked against the budget, or QEMU's memory if not."""
    try:
        return cortex_m.build_firmware(model, fw_dir, arena_bytes=arena, **kwargs), True
    except cortex_m.FirmwareError as error:
        if "overflowed" not in str(error):
            raise
    return cortex_m.build_firmware(model, fw_dir, arena_bytes=arena, fit_budget=False,
                                   **kwargs), False


def _allocates(model, fw_dir, arena, probe, cpu, **kwargs):
    """(elf, fits the STM32F746, the run of ``probe`` or None if AllocateTensors failed)."""
    elf, fits = _build(model, fw_dir, arena, cpu=cpu, **kwargs)
    try:
        return elf, fits, cortex_m.run_firmware(elf, probe, cpu=cpu)
    except cortex_m.FirmwareError as error:
        if "AllocateTensors failed" not in str(error):
            raise
    return elf, fits, None


def measured_firmware(model, fw_dir, probe, host_arena, cpu, **kwargs):
    """Firmware of ``model`` with the smallest arena (16-byte steps) its AllocateTensors
    accepts on the device: built with the host's ``arena_used_bytes()`` (x1.25 until
    AllocateTensors succeeds), one step run, rebuilt with the device's own figure rounded
    up to 16 bytes, and, if that fails (AllocateTensors' temporary allocations can peak
    above the final figure), bisected up to the arena that worked. Returns (elf, fits the
    STM32F746, arena)."""
    good = host_arena
    while True:
        _, _, run = _allocates(model, fw_dir, good, probe, cpu, **kwargs)
        if run is not None:
            break
        if good > 8 * host_arena:
            raise SystemExit(f"{model}: AllocateTensors fails with {good} arena bytes "
                             f"(host arena_used_bytes() {host_arena})")
        good = -(-int(good * 1.25) // 16) * 16
    boot = [x[:0] for x in probe]
    low = -(-run.arena_bytes // 16) * 16
    elf, fits, run = _allocates(model, fw_dir, low, boot, cpu, **kwargs)
    if run is not None:
        return elf, fits, low
    while good - low > 16:  # low fails, good works
        mid = (low + good) // 32 * 16
        low, good = (mid, good) if _allocates(model, fw_dir, mid, boot, cpu,
                                              **kwargs)[2] is None else (low, mid)
    elf, fits, _ = _allocates(model, fw_dir, good, boot, cpu, **kwargs)
    return elf, fits, good


def same_outputs(device, host_outputs, names) -> list:
    """Names of the outputs that differ (any step) between the device and host TFLM."""
    return [name for name, got, want in zip(names, device.outputs, host_outputs)
            if got.shape != want.shape or not np.array_equal(got, want)]


def memory_fields(elf) -> dict:
    mem = linker_map.read_map(elf.parent / "firmware.map")
    over = mem.over_budget()
    return {"flash_kb": _kb(mem.flash_bytes), "flash_over_kb": _kb(over["flash"]),
            "model_kb": _kb(mem.flash_parts.get("model", 0)),
            "code_kb": _kb(mem.flash_bytes - mem.flash_parts.get("model", 0)),
            "ram_kb": _kb(mem.ram_bytes), "ram_over_kb": _kb(over["ram"]),
            "flash_parts_kb": {k: _kb(v) for k, v in sorted(mem.flash_parts.items())},
            "ram_parts_kb": {k: _kb(v) for k, v in sorted(mem.ram_parts.items())}}


def outputs_digest(run, stored=None) -> str:
    """SHA-256 (12 hex digits) of a run's outputs at every step and, for a training graph,
    the state it stored in flash: equal digests of the CMSIS-NN and the reference firmware
    mean bit-identical losses, logits and weights."""
    digest = hashlib.sha256()
    for array in run.outputs:
        digest.update(np.ascontiguousarray(array).tobytes())
    for key in sorted(stored or {}):
        digest.update(key.encode() + np.ascontiguousarray(stored[key]).tobytes())
    return digest.hexdigest()[:12]


def instruction_fields(run, steps_from: int = 1) -> dict:
    later = run.instructions[steps_from:] if len(run.instructions) > steps_from \
        else run.instructions
    forward = sum(n for op, (_, n) in run.ops.items() if op in FORWARD_OPS)
    total = max(1, sum(n for _, n in run.ops.values()))
    per_step = float(np.median(later))
    # the profile sums every Invoke of the run: per Invoke, largest first
    invokes = len(run.instructions)
    ops = {op: round(n / invokes / 1e6, 2) for op, (_, n) in
           sorted(run.ops.items(), key=lambda kv: -kv[1][1])}
    return {"instructions_step0": int(run.instructions[0]),
            "instructions_per_step": int(per_step),
            "forward_share": round(forward / total, 3),
            "ops_minstr_per_invoke": ops,
            "top_ops_minstr": ", ".join(f"{op} {n:g}" for op, n in list(ops.items())[:4]),
            "stack_bytes": run.stack_bytes}


class Bench:
    """The firmwares and runs of one benchmark: per CPU and kernel set, the union of the
    TFLM kernels its models need (one library build each)."""

    def __init__(self, args, work: pathlib.Path):
        self.args, self.work, self.rows, self.kernels = args, work, [], {}
        self.host = {}  # label -> host TFLM runs of the firmware graph and the params graph
        self.built_with = None  # cores_digest() of the last firmware build

    def _add(self, row):
        """Keep (and print) a result row, with the digest of the C cores it ran."""
        row["cores"] = self.built_with
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def plan_kernels(self, cpu, cmsis_nn, *models_):
        key = (cpu, cmsis_nn)
        needed = [cortex_m.model_kernels(m) for m in models_]
        if any(k == [] for k in needed) or self.kernels.get(key) == []:
            self.kernels[key] = []
        else:
            self.kernels[key] = sorted(set(self.kernels.get(key, [])).union(*needed))

    def firmware(self, model, tag, probe, host_arena, cpu="m7", cmsis_nn=True):
        kwargs = {"cmsis_nn": cmsis_nn, "kernels": self.kernels[(cpu, cmsis_nn)]}
        self.built_with = cores_digest()  # what the library and firmware are built from
        tag = re.sub(r"[^A-Za-z0-9.-]+", "_", tag)  # make cannot handle spaces in paths
        folder = self.work / f"{tag}_{cpu}{'' if cmsis_nn else '_ref'}"
        return measured_firmware(model, folder, probe, host_arena, cpu, **kwargs)

    def training_rows(self, label, firmware_graph, params_graph, images, labels,
                      same_start=True, variants=(("m7", True),), params_row=True):
        """Rows of one training graph on each (cpu, CMSIS-NN or not) of ``variants``, and
        (``params_row``) the graph with parameter outputs on the M7. ``same_start``: both
        graphs start from the same weights, so the firmware graph's stored state is compared
        with the host's trainable tensors of the other. Returns the host run of the
        params graph."""
        if label not in self.host:  # params_graph None: no parameter-output graph
            self.host[label] = (train_tflm(firmware_graph.path, images, labels),
                                params_graph and train_tflm(params_graph.path, images, labels))
        host, host_params = self.host[label]
        if same_start and not np.array_equal(host.losses, host_params.losses):
            raise SystemExit(f"{label}: the two exports train differently on the host")
        names = firmware_graph.manifest["outputs"]
        inputs = [images, labels.astype(np.int32).reshape(-1, 1)]
        probe = [x[:1] for x in inputs]
        for cpu, cmsis_nn in variants:
            elf, fits, arena = self.firmware(firmware_graph.path, label, probe,
                                             host.arena_bytes, cpu, cmsis_nn)
            flash = elf.parent / "device.flash"
            flash.unlink(missing_ok=True)
            run = cortex_m.run_firmware(elf, inputs, cpu=cpu, flash=flash)
            boot = cortex_m.run_firmware(elf, [x[:0] for x in inputs], cpu=cpu, flash=flash)
            stored = cortex_m.state_params(boot, firmware_graph.manifest)
            state_diff = [key for key, value in stored.items() if same_start and not
                          np.array_equal(value, _param_output(host_params, key))]
            self._add({
                "model": label, "cpu": cpu, "kernels": "CMSIS-NN" if cmsis_nn else "reference",
                "what": "training step (firmware graph)", "steps": len(images),
                "identical_to_host": not same_outputs(run, host.result.outputs, names)
                and not state_diff,
                "differs": same_outputs(run, host.result.outputs, names) + state_diff,
                "loss_max_ulp": int(np.abs(run.outputs[0].view(np.int32).astype(np.int64)
                                           - host.result.outputs[0].view(np.int32)).max()),
                "compared": "outputs at every step" + (
                    " + the state stored in flash after the last step" if same_start else ""),
                "host_arena_kb": _kb(host.arena_bytes), "device_arena_kb": _kb(run.arena_bytes),
                "arena_ratio": round(run.arena_bytes / host.arena_bytes, 3),
                "linked_arena_bytes": arena,
                "fits_stm32f746": fits, **memory_fields(elf), **instruction_fields(run),
                "tinyengine_ratio": round(float(np.median(run.instructions[1:]))
                                          / TINYENGINE_CYCLES, 2),
                "losses": [round(float(v), 4) for v in run.outputs[0][:, 0]],
                "commit": run.commit, "outputs_sha": outputs_digest(run, stored)})
        if params_row:
            self._params_graph_row(label, params_graph, host_params, inputs)
        return host_params

    def _params_graph_row(self, label, graph, host, inputs):
        """The graph with parameter outputs on the M7: every trainable tensor, every step."""
        probe = [x[:1] for x in inputs]
        elf, fits, _ = self.firmware(graph.path, label + "_params", probe, host.arena_bytes)
        run = cortex_m.run_firmware(elf, inputs)
        differs = same_outputs(run, host.result.outputs, graph.manifest["outputs"])
        self._add({"model": label, "cpu": "m7", "kernels": "CMSIS-NN",
                          "what": "training step, every trainable tensor as an output",
                          "steps": len(inputs[0]), "identical_to_host": not differs,
                          "differs": differs, "host_arena_kb": _kb(host.arena_bytes),
                          "device_arena_kb": _kb(run.arena_bytes),
                          "arena_ratio": round(run.arena_bytes / host.arena_bytes, 3),
                          "fits_stm32f746": fits, **instruction_fields(run)})

    def inference_rows(self, label, model, images_q, labels):
        """The adapted inference model on the M7 (CMSIS-NN and reference kernels)."""
        host = run_inference_tflm(model, images_q)
        logits = host.outputs[0].reshape(len(images_q), -1)
        for cmsis_nn in [True] * self.args.cmsis_nn + [False] * self.args.reference:
            elf, fits, arena = self.firmware(model, label + "_inference", [images_q[:1]],
                                             host.arena_bytes, "m7", cmsis_nn)
            run = cortex_m.run_firmware(elf, [images_q])
            got = run.outputs[0].reshape(len(images_q), -1)
            self._add({
                "model": label, "cpu": "m7", "kernels": "CMSIS-NN" if cmsis_nn else "reference",
                "what": "inference (adapted model)", "steps": len(images_q),
                "identical_to_host": bool(np.array_equal(got, logits)),
                "accuracy": round(float((got.argmax(-1) == labels).mean()), 4),
                "host_arena_kb": _kb(host.arena_bytes), "device_arena_kb": _kb(run.arena_bytes),
                "arena_ratio": round(run.arena_bytes / host.arena_bytes, 3),
                "linked_arena_bytes": arena, "fits_stm32f746": fits, **memory_fields(elf),
                **instruction_fields(run, steps_from=0), "outputs_sha": outputs_digest(run)})


def _minstr(row, ours: bool) -> float:
    """Million instructions per Invoke in the dgst ops (``ours``) or in TFLM's builtins."""
    return round(sum(n for op, n in row["ops_minstr_per_invoke"].items()
                     if op.startswith("DGST_") == ours), 2)


def kernel_comparison(rows) -> list:
    """The M7 runs with CMSIS-NN and with TFLM's reference kernels side by side, per model
    and run (training step of the firmware graph, inference of the adapted model):
    instructions per step / inference with each, their ratio, the builtin operators' share
    (the only operators the kernel set changes: the dgst ops are the same C in both),
    bit-identity (each equal to host TFLM; the two runs' output digests equal) and, for a
    training step, TinyEngine's published cycles beside each count."""
    pairs = {}
    for row in rows:
        if row["cpu"] == "m7" and row["what"] in ("training step (firmware graph)",
                                                  "inference (adapted model)"):
            pairs.setdefault((row["model"], row["what"]), {})[row["kernels"]] = row
    out = []
    for (model, what), by in pairs.items():
        if set(by) != {"CMSIS-NN", "reference"}:
            continue
        cm, ref = by["CMSIS-NN"], by["reference"]
        training = what.startswith("training")
        row = {"model": model, "what": "training step" if training else "inference",
               "steps": cm["steps"],
               "minstr_cmsis_nn": round(cm["instructions_per_step"] / 1e6, 1),
               "minstr_reference": round(ref["instructions_per_step"] / 1e6, 1),
               "reference_over_cmsis_nn": round(ref["instructions_per_step"]
                                                / cm["instructions_per_step"], 3),
               "builtins_minstr_cmsis_nn": _minstr(cm, False),
               "builtins_minstr_reference": _minstr(ref, False),
               "dgst_ops_minstr_cmsis_nn": _minstr(cm, True),
               "dgst_ops_minstr_reference": _minstr(ref, True),
               "identical_to_host_cmsis_nn": cm["identical_to_host"],
               "identical_to_host_reference": ref["identical_to_host"],
               "same_outputs_both": cm["outputs_sha"] == ref["outputs_sha"],
               "cores": cm["cores"] if cm["cores"] == ref["cores"]
               else f"{cm['cores']} / {ref['cores']}"}
        if training:
            row.update({"tinyengine_mcycles": round(TINYENGINE_CYCLES / 1e6, 1),
                        "cmsis_nn_over_tinyengine": cm["tinyengine_ratio"],
                        "reference_over_tinyengine": ref["tinyengine_ratio"]})
        out.append(row)
    return out


KERNEL_COLUMNS = [
    "model", "what", "steps", "minstr_cmsis_nn", "minstr_reference", "reference_over_cmsis_nn",
    "builtins_minstr_cmsis_nn", "builtins_minstr_reference", "dgst_ops_minstr_cmsis_nn",
    "dgst_ops_minstr_reference", "identical_to_host_cmsis_nn", "identical_to_host_reference",
    "same_outputs_both", "tinyengine_mcycles", "cmsis_nn_over_tinyengine",
    "reference_over_tinyengine", "cores"]
QEMU_CAVEAT = ("QEMU -icount counts instructions, not cycles: it models no pipeline, caches "
               "or flash wait states, so instructions / TinyEngine's cycles is indicative only "
               "(a Cortex-M7 retires up to 2 instructions per cycle and stalls on flash and "
               "memory)")


def _param_output(run, key):
    """Host TFLM's value of trainable tensor ``key`` after the last step (as stored)."""
    names = run.manifest["outputs"]
    return run.result.outputs[names.index(key)][-1]


def mobilenet_cases(bench, args):
    size = (args.image_size, args.image_size)
    model = fold_batchnorm(models.mobilenet_v2(0.35, (*size, 3), classes=10, weights=None,
                                               seed=args.seed))
    scheme = UpdateScheme.from_backward_config(model, *LIN_49KB)
    calib, _ = data.load_arrays("cifar10", "train", path=args.data, image_size=size,
                                limit=64, seed=args.seed + 1)
    x, y = data.load_arrays("cifar10", "train", path=args.data, image_size=size,
                            limit=args.steps, seed=args.seed)
    xt, yt = data.load_arrays("cifar10", "test", path=args.data, image_size=size,
                              limit=args.inferences, seed=args.seed)
    cases = {name: options for name, options in MOBILENET_CASES.items()
             if name in args.cases}
    graphs = {}
    for name, options in cases.items():
        label = f"MobileNetV2-0.35 {size[0]} Lin 49KB {name}"
        stem = re.sub(r"[^A-Za-z0-9]+", "_", f"{name}_{size[0]}_seed{args.seed}")
        graphs[label] = [exported(model, scheme, calib, bench.work / f"{stem}_{p}.tflite",
                                  learning_rate=0.001, output_params=p == "params",
                                  seed=args.seed, **options)
                         for p in ("firmware", "params")]
    return graphs, (x, y), (xt, yt)


def exported(model, scheme, calib, path, **options):
    """`export_training` into ``path``, or the export already there (a ``--work-dir`` kept
    from an earlier run: its manifest's checksum must match the file)."""
    if path.is_file():
        try:
            graph = _training_graph(path)
            print(f"reusing {path}", flush=True)
            return graph
        except (ValueError, OSError) as error:
            print(f"exporting {path} again: {error}", flush=True)
    return export_training(model, scheme, calib, path, **options)


def pipeline_cases(args):
    """The device pipeline's graphs and data: (training graph, the graph with parameter
    outputs or None, the adapted model or None, the pipeline's settings, train and test
    arrays). ``--pipeline-model``: a deploy_train.tflite, the other two models taken when
    they are beside it; ``--pipeline-dir``: the folder, every file required."""
    if args.pipeline_model:
        model = pathlib.Path(args.pipeline_model)
        folder, option = model.parent, f"--pipeline-model {model}"
        needed = [model.name, model.with_suffix(".json").name, "prune.stage.json"]
    else:
        folder, option = pathlib.Path(args.pipeline_dir), f"--pipeline-dir {args.pipeline_dir}"
        model = folder / "deploy_train.tflite"
        needed = ["deploy_train.tflite", "check_start.tflite", "adapted.tflite",
                  "prune.stage.json"]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise SystemExit(f"{option}: missing {missing} in {folder} (run `dgst device "
                         f"--output-dir {folder}` first, or give --skip-pipeline)")
    params, adapted = (folder / n if (folder / n).is_file() else None
                       for n in ("check_start.tflite", "adapted.tflite"))
    for name, path in (("check_start.tflite (parameter outputs)", params),
                       ("adapted.tflite (inference)", adapted)):
        if path is None:
            print(f"{option}: no {name} in {folder}: its rows are left out", flush=True)
    settings = json.loads((folder / "prune.stage.json").read_text())["settings"]
    size = (settings["image_size"],) * 2
    common = dict(path=settings["data_path"], image_size=size,
                  preprocessing=models.preprocessing_for(settings["weights"]))
    x, y = data.load_arrays(settings["dataset"], "train", limit=args.steps,
                            seed=args.seed + 7, **common)
    xt, yt = data.load_arrays(settings["dataset"], args.inference_split,
                              limit=args.inferences, seed=args.seed, **common)
    return model, params, adapted, settings, (x, y), (xt, yt)


def _training_graph(path) -> types.SimpleNamespace:
    """An exported training graph on disk, as `export_training` returns it (path, manifest)."""
    return types.SimpleNamespace(path=pathlib.Path(path), manifest=load_manifest(path))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="CIFAR-10 folder or archive (default: "
                                               "$DGST_CIFAR10 / ../shared/datasets)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="training steps per run")
    p.add_argument("--inferences", type=int, default=50, help="test images per inference run")
    p.add_argument("--cpus", nargs="+", default=["m7", "m4"], choices=sorted(cortex_m.CPUS))
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip TFLM's reference kernels (a second library build)")
    p.add_argument("--no-cmsis-nn", dest="cmsis_nn", action="store_false",
                   help="only TFLM's reference kernels (M7; e.g. to add them to a run "
                        "without them: give --name)")
    p.add_argument("--pipeline-dir", default="device_run",
                   help="output folder of `dgst device` (deploy_train.tflite, ...)")
    p.add_argument("--pipeline-model", default=None, metavar="PATH",
                   help="the device pipeline's deploy_train.tflite (instead of "
                        "--pipeline-dir): prune.stage.json must be beside it; "
                        "check_start.tflite and adapted.tflite are used if they are")
    p.add_argument("--inference-split", default="test", choices=["test", "train"],
                   help="images of the pipeline model's inference rows (accuracy column): "
                        "train keeps a model whose protocol has not read the test set yet "
                        "away from it")
    p.add_argument("--skip-pipeline", action="store_true",
                   help="leave out the device pipeline's pruned model (read from "
                        "--pipeline-dir / --pipeline-model, never run here)")
    p.add_argument("--skip-mobilenet", action="store_true")
    p.add_argument("--cases", nargs="+", default=list(MOBILENET_CASES),
                   choices=list(MOBILENET_CASES), help="MobileNetV2 graphs to run")
    p.add_argument("--name", default="cortex_m_training")
    p.add_argument("--work-dir", default=None,
                   help="keep the exported models and firmwares here and reuse the exports "
                        "found there (default: a temporary folder, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    runtime.limit_threads(1)
    with tempfile.TemporaryDirectory(prefix="dgst-cortex-m-") as tmp:
        work = pathlib.Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, work)
        settings = {"steps": args.steps, "inferences": args.inferences, "cpus": args.cpus,
                    "cmsis_nn": args.cmsis_nn, "reference_kernels": args.reference,
                    "seed": args.seed,
                    "qemu": "qemu-system-arm -M mps2-an500 (M7) / mps2-an386 (M4), -icount "
                            "shift=6: instructions, not cycles",
                    "tinyengine": f"{TINYENGINE_MS} ms per step at {STM32F746_MHZ} MHz = "
                                  f"{TINYENGINE_CYCLES / 1e6:.1f} M cycles (Lin et al. 2022; "
                                  f"their TFLM-kernel baseline {TFLM_BASELINE_MS} ms = "
                                  f"{TFLM_BASELINE_MS * 1e-3 * STM32F746_MHZ:.0f} M cycles)",
                    "budget": "STM32F746: 1 MB flash, 320 KB SRAM (linker map, arena at the "
                              "device's arena_used_bytes)"}
        jobs = []
        if not args.skip_mobilenet:
            graphs, (x, y), (xt, yt) = mobilenet_cases(bench, args)
            settings["mobilenet"] = ("MobileNetV2 w0.35, random init (seed), CIFAR-10, "
                                     "tiny-training 49KB scheme, lr 0.001, stochastic rounding;"
                                     " its inference accuracy is that of a random-init model "
                                     "after a few steps (chance), reported only to show the "
                                     "adapted model runs")
            settings["mobilenet_cases"] = args.cases
            for label, (fw, params) in graphs.items():
                spec = fw.manifest["inputs"][0]
                jobs.append((label, fw, params, quantized(x, spec), y, True))
            inference_input = quantized(xt, next(iter(graphs.values()))[0].manifest["inputs"][0])
        if not args.skip_pipeline:
            model, params, adapted_model, pipe, (px, py), (pxt, pyt) = pipeline_cases(args)
            settings["pipeline"] = {k: pipe[k] for k in ("dataset", "image_size", "width",
                                                         "flash_budget", "seed")}
            settings["pipeline_model"] = str(model)
            settings["pipeline_inference_split"] = args.inference_split
            settings["pipeline_rows_left_out"] = [
                what for what, path in (("check_start.tflite", params),
                                        ("adapted.tflite", adapted_model)) if path is None]
            fw = _training_graph(model)
            params = params and _training_graph(params)
            spec = fw.manifest["inputs"][0]
            # check_start.tflite starts from the trained weights, deploy_train.tflite not
            jobs.append(("device pipeline (pruned MobileNetV2)", fw, params,
                         quantized(px, spec), py, False))
            pipeline_adapted = adapted_model and (adapted_model, quantized(pxt, spec), pyt)
        # one library per CPU and kernel set, with the union of the models' TFLM kernels
        models_ = [j[1].path for j in jobs] + [j[2].path for j in jobs if j[2] is not None]
        if not args.skip_pipeline and pipeline_adapted:
            models_.append(pipeline_adapted[0])
        for cpu in args.cpus if args.cmsis_nn else []:
            bench.plan_kernels(cpu, True, *models_)
        if args.reference:
            bench.plan_kernels("m7", False, *models_)
        # the M7 first (and the reference kernels), the other CPUs after the inference
        # runs: their libraries build meanwhile
        first = [("m7", True)] * ("m7" in args.cpus and args.cmsis_nn) + \
            [("m7", False)] * args.reference
        later = [(cpu, True) for cpu in args.cpus if cpu != "m7" and args.cmsis_nn]
        adapted = []
        for label, fw, params, images, labels, same_start in jobs:
            host_params = bench.training_rows(label, fw, params, images, labels, same_start,
                                              first, params_row=args.cmsis_nn
                                              and params is not None)
            if label.startswith("MobileNetV2") and "builtin" not in label:
                # the device's trained weights: equal to the host's (checked by the rows)
                path = bench.work / f"adapted_{len(adapted)}.tflite"
                adapted.append((label, write_inference_model(params.path, host_params.params,
                                                             path), inference_input, yt))
        if not args.skip_pipeline and pipeline_adapted:
            adapted.append(("device pipeline (pruned MobileNetV2)", *pipeline_adapted))
        for label, model, images_q, labels in adapted:
            for cmsis_nn in [True] * args.cmsis_nn + [False] * args.reference:
                bench.plan_kernels("m7", cmsis_nn, model)
            bench.inference_rows(label, model, images_q, labels)
        for label, fw, params, images, labels, same_start in jobs:
            bench.training_rows(label, fw, params, images, labels, same_start, later,
                                params_row=False)
        order = {label: i for i, (label, *_) in enumerate(jobs)}
        bench.rows.sort(key=lambda row: (order.get(row["model"], len(order)),
                                         not row["what"].startswith("training step ("),
                                         row["what"].startswith("inference")))
        digests = sorted({row["cores"] for row in bench.rows})
        settings["cores"] = digests if len(digests) > 1 else digests[0]
        if len(digests) > 1:
            print(f"WARNING: the C cores changed during the run: rows ran {digests}",
                  flush=True)
        comparison = kernel_comparison(bench.rows)
        if comparison:
            print(_report.write(f"{args.name}_kernels", {
                **settings, "caveat": QEMU_CAVEAT,
                "columns": "minstr_*: million QEMU instructions per training step (median of "
                           "steps 1..N-1) or per inference, CMSIS-NN / reference kernels; "
                           "builtins_* and dgst_ops_*: million instructions per Invoke in TFLM's "
                           "builtin operators and in the dgst ops; same_outputs_both: the two "
                           "firmwares' outputs at every step and stored weights have one "
                           "SHA-256"}, comparison, KERNEL_COLUMNS))
        print(_report.write(args.name, settings, bench.rows, [
            "model", "what", "cpu", "kernels", "steps", "identical_to_host", "differs",
            "loss_max_ulp",
            "host_arena_kb", "device_arena_kb", "arena_ratio", "fits_stm32f746", "flash_kb",
            "flash_over_kb", "model_kb", "code_kb", "ram_kb", "ram_over_kb",
            "instructions_step0", "instructions_per_step", "forward_share",
            "tinyengine_ratio", "top_ops_minstr", "accuracy", "stack_bytes", "cores"]))


if __name__ == "__main__":
    main()
