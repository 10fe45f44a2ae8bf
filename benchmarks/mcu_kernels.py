"""Instruction counts of the training kernels on Cortex-M7 / Cortex-M4 in QEMU.

    python benchmarks/mcu_kernels.py [--npz real_tensors.npz] [--seed 0]
    python benchmarks/mcu_kernels.py --real [REAL_STEP.npz] [--image chelsea|cifar10]

``--real``: one training step of the real ImageNet MobileNetV2-1.0 tail (classifier, head
conv, block 16; dgst_tf.tflm_ops.real_vectors exports it unless an .npz is given), on its real
layer shapes: instructions per kernel, per training-step part and layer, sparse (2% of the
input channels) vs dense weight gradients and updates, and CMSIS-NN's forward
arm_convolve_1x1_s8 (and _fast) on the same 1x1 layers and data as the practical reference
(tflm_ops/mcu/cmsis_nn_reference.c; CMSIS-NN unpacked from the pinned archive in TFLM_DEPS
into tflm_ops/build/cmsis_nn). Writes benchmarks/results/mcu_kernels_real.{json,md} (build
under tflm_ops/build/real).

Both modes also print instructions per MAC before / after the issue-21 kernel work: "before"
is benchmarks/results/mcu_kernels_baseline.json (the same firmware measured on the kernels
of commit 477b992).

Builds the firmware of tflm_ops/mcu (make mcu mcu-m4 mcu-nodsp), runs each in QEMU with
``-icount shift=6`` and reads the exact instruction count of every kernel call (CMSDK
timer0, see tflm_ops/mcu/mcu_support.h), its peak stack (stack painting), and the flash /
RAM use from the linker. Writes benchmarks/results/mcu_kernels.{json,md}: a row per
(case, kernel), then sections on the weight-gradient loop (optimized vs the straightforward
reference, instructions per MAC), dense vs sparse weight gradients, and memory.

QEMU counts instructions, not cycles: it models no pipeline, caches or flash wait states.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys

import _report

from dgst_tf.core.files import write_atomically
from dgst_tf.core.geometry import channels_for_ratio
from dgst_tf.tflm_ops import host as _host  # make under the build lock

HERE = os.path.dirname(os.path.abspath(__file__))

ROOT = os.path.dirname(HERE)
TFLM_OPS = os.path.join(ROOT, "tflm_ops")
BUILD = os.path.join(TFLM_OPS, "build", "mcu")
QEMU_FLAGS = ["-nographic", "-semihosting", "-icount", "shift=6,align=off,sleep=off"]
VARIANTS = {  # name: (make target, QEMU machine, label)
    "m7": ("mcu", "mps2-an500", "Cortex-M7 (DSP/SIMD C)"),
    "m4": ("mcu-m4", "mps2-an386", "Cortex-M4 (DSP/SIMD C)"),
    "m7-nodsp": ("mcu-nodsp", "mps2-an500", "Cortex-M7, plain C (-DDGST_NO_DSP)"),
}
LINE = re.compile(r"DGST case=(\S+) kernel=(\S+) instructions=(\d+) macs=(\d+) stack=(\d+) "
                  r"elements=(\d+) status=(\S+)")
SWEEPS = ("b3_expand", "b15_expand")  # layers whose weight gradient runs at several k


REAL_BUILD = os.path.join(TFLM_OPS, "build", "real")
CMSIS_BUILD = os.path.join(TFLM_OPS, "build", "cmsis_nn")
THIRD_PARTY = os.environ.get("TFLM_DEPS", os.path.join(ROOT, "..", "shared", "third_party"))
CMSIS_ARCHIVE = "cmsis-nn-4ab83cc3.tar.gz"
CMSIS_SOURCES = ("Source/ConvolutionFunctions/arm_convolve_1x1_s8.c",
                 "Source/ConvolutionFunctions/arm_convolve_1x1_s8_fast.c",
                 "Source/NNSupportFunctions/arm_nn_mat_mult_nt_t_s8.c")
CPU_FLAGS = {"m7": ["-mcpu=cortex-m7", "-mfpu=fpv5-d16", "-mfloat-abi=hard"],
             "m4": ["-mcpu=cortex-m4", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard"]}
BASELINE = os.path.join(HERE, "results", "mcu_kernels_baseline.json")
# kernel families of issue 21 and their targets (instructions per MAC, Cortex-M7)
TARGETS = {"conv2d_weight_grad_s8": 2.0, "classifier": 3.0, "depthwise_weight_grad_s8": 4.0,
           "fused_block": 6.0}


def build(args):
    cmd = ["-j2", *[v[0] for v in VARIANTS.values()], f"PYTHON={sys.executable}",
           f"SEED={args.seed}"]
    if args.npz:
        cmd.append(f"NPZ={os.path.abspath(args.npz)}")
    proc = _host.make(*cmd)
    if proc.returncode != 0:
        sys.exit(f"make failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def run(variant, build_dir=BUILD):
    _, machine, _ = VARIANTS[variant]
    proc = subprocess.run(["qemu-system-arm", "-M", machine, *QEMU_FLAGS, "-kernel",
                           os.path.join(build_dir, variant, "firmware.elf")],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    rows = [dict(zip(("case", "kernel", "instructions", "macs", "stack", "elements",
                      "status"), m.groups())) for m in LINE.finditer(out)]
    for r in rows:
        for key in ("instructions", "macs", "stack", "elements"):
            r[key] = int(r[key])
    if proc.returncode != 0 or any(r["status"] != "ok" for r in rows):
        sys.exit(f"{variant}: firmware failed (exit {proc.returncode}):\n{out[-3000:]}")
    summary = re.search(r"kernel_stack_max=(\d+) firmware_stack_peak=(\d+)", out)
    loop = int(re.search(r"loop_instructions=(\d+)", out).group(1))
    return rows, {"kernel_stack_max": int(summary.group(1)),
                  "firmware_stack_peak": int(summary.group(2)),
                  "calibration_loop_instructions": loop, "calibration_expected": 20000}


def memory(variant, build_dir=BUILD):
    """Flash / RAM of the firmware (from its sections) and code size per kernel object."""
    text = open(os.path.join(build_dir, variant, "size.txt")).read()
    sec = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\.\S+)\s+(\d+)\s+\d+", text,
                                                            flags=re.M)}
    flash_sections = (".isr_vector", ".text", ".rodata", ".ARM.exidx", ".ARM.extab",
                      ".preinit_array", ".init_array", ".fini_array", ".data")
    flash = sum(sec.get(s, 0) for s in flash_sections)
    ram = sum(sec.get(s, 0) for s in (".data", ".bss", ".heap", ".stack"))
    code = {}
    for line in open(os.path.join(build_dir, variant, "kernels_size.txt")).read().splitlines()[1:]:
        f = line.split()
        code[os.path.basename(f[5])[:-2]] = int(f[0]) + int(f[1])
    static_stack = {}
    for su in glob.glob(os.path.join(build_dir, variant, "obj", "core", "*.su")):
        for line in open(su):
            where, size, _ = line.rsplit("\t", 2)
            static_stack[where.rsplit(":", 1)[-1]] = int(size)
    return {"flash_bytes": flash, "ram_bytes": ram, "flash_budget": 1024 * 1024,
            "ram_budget": 320 * 1024, "sections": sec, "kernel_code_bytes": code,
            "kernel_code_total_bytes": sum(v for k, v in code.items()
                                           if k != "conv2d_weight_grad_ref"),
            "static_stack_bytes": static_stack}


def kept_of(case):
    m = re.search(r"_k(\d+)$", case)
    return int(m.group(1)) if m else ""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--npz", help="real tensors for the test vectors (see "
                                 "tflm_ops/mcu/gen_vectors.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", nargs="?", const="export", metavar="REAL_STEP.npz",
                   help="one real training step (dgst_tf.tflm_ops.real_vectors exports it unless "
                        "an .npz is given)")
    p.add_argument("--image", choices=("chelsea", "cifar10"), help="image of --real")
    p.add_argument("--image-size", type=int, default=96, help="input size of --real")
    args = p.parse_args()
    if args.real:
        return main_real(args)
    build(args)
    results, extra, mem = {}, {}, {}
    for variant in VARIANTS:
        results[variant], extra[variant] = run(variant)
        mem[variant] = memory(variant)
    m7 = results["m7"]
    index = {v: {(r["case"], r["kernel"]): r for r in rows} for v, rows in results.items()}

    rows = []
    for r in m7:
        key = (r["case"], r["kernel"])
        row = {"case": r["case"], "kernel": r["kernel"], "k": kept_of(r["case"]),
               "macs": r["macs"] or "", "m7_instructions": r["instructions"],
               "m7_instr_per_mac": round(r["instructions"] / r["macs"], 3) if r["macs"] else "",
               "m4_instructions": index["m4"][key]["instructions"],
               "m7_plain_c_instructions": index["m7-nodsp"][key]["instructions"],
               "stack_bytes": r["stack"], "elements": r["elements"]}
        ref_key = (r["case"], "conv2d_weight_grad_s8_ref")
        if r["kernel"] == "conv2d_weight_grad_s8" and ref_key in index["m7"]:
            ref = index["m7"][ref_key]["instructions"]
            row["ref_over_opt"] = round(ref / r["instructions"], 2)
        rows.append(row)
    columns = ["case", "kernel", "k", "macs", "m7_instructions", "m7_instr_per_mac",
               "m4_instructions", "m7_plain_c_instructions", "ref_over_opt", "stack_bytes"]

    # weight-gradient loop: optimized vs reference, instructions per MAC
    wgrad = []
    for (case, kernel), r in index["m7"].items():
        if kernel != "conv2d_weight_grad_s8" or (case, kernel + "_ref") not in index["m7"]:
            continue
        item = {"case": case, "macs": r["macs"]}
        for v in VARIANTS:
            opt = index[v][case, kernel]["instructions"]
            ref = index[v][case, kernel + "_ref"]["instructions"]
            item[f"{v}_opt_per_mac"] = round(opt / r["macs"], 3)
            item[f"{v}_ref_per_mac"] = round(ref / r["macs"], 3)
        wgrad.append(item)

    # dense vs sparse weight gradient on the same layer
    sparse = []
    for layer in SWEEPS:
        cases = sorted((kept_of(c), c) for (c, kern) in index["m7"]
                       if kern == "conv2d_weight_grad_s8" and c.startswith(layer + "_k"))
        if not cases:
            continue
        dense_k, dense_case = cases[-1]
        dense = index["m7"][dense_case, "conv2d_weight_grad_s8"]["instructions"]
        for k, case in cases:
            r = index["m7"][case, "conv2d_weight_grad_s8"]
            sparse.append({"layer": layer, "k": k, "c_in": dense_k,
                           "ratio": round(k / dense_k, 4), "macs": r["macs"],
                           "m7_instructions": r["instructions"],
                           "m4_instructions": index["m4"][case, "conv2d_weight_grad_s8"][
                               "instructions"],
                           "fraction_of_dense": round(r["instructions"] / dense, 4),
                           "ref_m7_instructions": index["m7"][
                               case, "conv2d_weight_grad_s8_ref"]["instructions"]})

    settings = {"qemu": "qemu-system-arm " + " ".join(QEMU_FLAGS),
                "machines": {v: VARIANTS[v][1] for v in VARIANTS},
                "cflags": "-O2 -mthumb -ffp-contract=off (M7: -mcpu=cortex-m7 -mfpu=fpv5-d16; "
                          "M4: -mcpu=cortex-m4 -mfpu=fpv4-sp-d16; -mfloat-abi=hard)",
                "compiler": subprocess.run(["arm-none-eabi-gcc", "--version"],
                                           capture_output=True, text=True).stdout.splitlines()[0],
                "vectors": f"npz {args.npz}" if args.npz else f"random, seed {args.seed}",
                "counting": "instructions = timer0 ticks x 40 / 64 (icount shift 6, 25 MHz timer)"}
    payload_extra = {"weight_grad_per_mac": wgrad, "dense_vs_sparse": sparse, "memory": mem,
                     "stack": extra, "all_results": results}
    table = _report.write("mcu_kernels", {**settings, **{"see": "json: weight_grad_per_mac, "
                                                                "dense_vs_sparse, memory"}},
                          rows, columns)
    # The JSON gets the extra sections; the Markdown gets readable tables of them.
    json_path = os.path.join(HERE, "results", "mcu_kernels.json")
    with open(json_path) as f:
        payload = json.load(f)
    payload.update(payload_extra)
    write_atomically(json_path, json.dumps(payload, indent=1))
    before_after = _before_after("synthetic", index)
    payload["before_after"] = before_after
    write_atomically(json_path, json.dumps(payload, indent=1))
    md = _markdown(table, wgrad, sparse, mem, extra) + _before_after_markdown(before_after)
    write_atomically(os.path.join(HERE, "results", "mcu_kernels.md"), "\n".join(md))
    print("\n".join(md[md.index("## Weight gradient: optimized vs straightforward loop "
                                "(instructions per MAC)"):]))


def _family(case: str, kernel: str) -> str | None:
    """The issue-21 kernel family of a (case, kernel) row, or None."""
    if kernel == "conv2d_weight_grad_s8":
        return "classifier" if case.startswith(("fc", "classifier")) else kernel
    return kernel if kernel in ("depthwise_weight_grad_s8", "fused_block") else None


def _before_after(vectors: str, index: dict) -> list[dict]:
    """Instructions per MAC before (mcu_kernels_baseline.json) and now, per (case, kernel) of
    the issue-21 families, M7 and M4 (the real dense chunks: their first part only)."""
    with open(BASELINE) as f:
        before = json.load(f)[vectors]
    rows = []
    for (case, kernel), r in index["m7"].items():
        family = _family(case, kernel)
        if family is None or not r["macs"] or re.search(r"_part[1-9]\d*$", case):
            continue
        row = {"case": case, "kernel": kernel, "family": family, "target": TARGETS[family],
               "macs": r["macs"]}
        for v in ("m7", "m4"):
            old = before[v].get(f"{case}/{kernel}")
            row[f"{v}_before"] = round(old["instructions"] / r["macs"], 3) if old else ""
            row[f"{v}_after"] = round(index[v][case, kernel]["instructions"] / r["macs"], 3)
        row["met"] = row["m7_after"] <= row["target"]
        rows.append(row)
    return rows


def _before_after_markdown(rows: list[dict]) -> list[str]:
    md = ["## Issue 21: instructions per MAC before / after (Cortex-M7 target)", "",
          "| case | kernel | MACs | M7 before | M7 after | M4 before | M4 after | target (M7) "
          "| met |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['kernel']} | {r['macs']} | {r['m7_before']} | "
                  f"{r['m7_after']} | {r['m4_before']} | {r['m4_after']} | <= {r['target']} | "
                  f"{'yes' if r['met'] else 'no'} |")
    md += ["", "before: benchmarks/results/mcu_kernels_baseline.json (kernels of commit "
           "477b992, same harness and vectors). Every row is bit-exact against reference.py on "
           "both cores (the firmware checks each output).", ""]
    return md


# ----------------------------------------------------------------------------- CMSIS-NN
def _cmsis_tree() -> str:
    """CMSIS-NN unpacked from the pinned archive into a git-ignored build folder."""
    import tarfile
    tree = os.path.join(CMSIS_BUILD, "cmsis-nn")
    stamp = os.path.join(CMSIS_BUILD, "unpacked.stamp")
    if not os.path.exists(stamp):
        archive = os.path.join(THIRD_PARTY, CMSIS_ARCHIVE)
        if not os.path.exists(archive):
            sys.exit(f"CMSIS-NN archive {archive} not found (set TFLM_DEPS to the folder of "
                     f"the pinned TFLM archives)")
        tmp = tree + ".tmp"
        subprocess.run(["rm", "-rf", tree, tmp], check=True)
        os.makedirs(tmp)
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                m.name = m.name.split("/", 1)[1] if "/" in m.name else ""
                if m.name:
                    tar.extract(m, tmp)
        os.rename(tmp, tree)
        open(stamp, "w").close()
    return tree


def _cmsis_header(npz: str, seed: int = 0) -> tuple[str, list[dict]]:
    """cmsis_layers.h: the real 1x1 layers (x, weights, bias of the --real step) with TFLite
    requantization constants (QuantizeMultiplier(x_scale * weight_scale / y_scale),
    y_scale = 6 / 255, the ReLU6 output range)."""
    import numpy as np
    from dgst_tf.core.tflite_requantization import quantize_multiplier
    z = np.load(npz)
    rng = np.random.default_rng(seed)
    lines, layers = ["/* generated by benchmarks/mcu_kernels.py --real */", "#include <stdint.h>"], []
    for name in (str(n) for n in z["meta/layers"]):
        w = z[f"{name}/w"]
        if str(z[f"{name}/kind"]) != "conv" or w.shape[1:3] != (1, 1) or name == "classifier":
            continue
        x = z[f"{name}/x"].astype(np.int8)
        h, wd, c_in = x.shape
        c_out = w.shape[0]
        x_scale = float(z[f"{name}/x_scale"])
        ws = np.asarray(z[f"{name}/weight_scale"], np.float64)
        mult, shift = zip(*(quantize_multiplier(x_scale * float(s) / (6.0 / 255.0)) for s in ws))
        bias = z[f"{name}/bias"].astype(np.int32) if f"{name}/bias" in z else \
            rng.integers(-3000, 3000, c_out).astype(np.int32)
        arrays = {"x": ("int8_t", x.ravel()), "w": ("int8_t", w.reshape(c_out, c_in).ravel()),
                  "bias": ("int32_t", bias.ravel()), "mult": ("int32_t", np.array(mult)),
                  "shift": ("int32_t", np.array(shift))}
        for field, (ctype, values) in arrays.items():
            lines.append(f"static const {ctype} {name}_{field}[{values.size}] = {{"
                         + ", ".join(str(int(v)) for v in values) + "};")
        lines.append(f"#define {name}_x_offset ({-int(z[f'{name}/x_zero_point'])})")
        lines.append(f"#define {name}_y_offset (-128)")
        layers.append({"layer": name, "h": h, "w": wd, "c_in": c_in, "c_out": c_out})
    lines.append("#define DGST_CMSIS_LAYERS(X) " + " ".join(
        f"X({L['layer']}, {L['h']}, {L['w']}, {L['c_in']}, {L['c_out']})" for L in layers))
    return "\n".join(lines) + "\n", layers


def cmsis_reference(npz: str) -> tuple[dict, list[dict], dict]:
    """Build and run the CMSIS-NN reference firmware on M7 and M4: rows per variant."""
    tree = _cmsis_tree()
    header, layers = _cmsis_header(npz)
    os.makedirs(CMSIS_BUILD, exist_ok=True)
    with open(os.path.join(CMSIS_BUILD, "cmsis_layers.h"), "w") as f:
        f.write(header)
    mcu, core = os.path.join(TFLM_OPS, "mcu"), os.path.join(TFLM_OPS, "core")
    sources = [os.path.join(mcu, "cmsis_nn_reference.c"), os.path.join(mcu, "startup.c"),
               os.path.join(core, "conv2d_forward.c")] + [os.path.join(tree, s)
                                                          for s in CMSIS_SOURCES]
    flags = ["-mthumb", "-O2", "-std=c99", "-ffp-contract=off", "-ffunction-sections",
             "-fdata-sections", f"-I{core}", f"-I{mcu}", f"-I{os.path.join(tree, 'Include')}",
             f"-I{CMSIS_BUILD}"]
    results = {}
    for v, machine in (("m7", "mps2-an500"), ("m4", "mps2-an386")):
        elf = os.path.join(CMSIS_BUILD, v, "firmware.elf")
        os.makedirs(os.path.dirname(elf), exist_ok=True)
        proc = subprocess.run(["arm-none-eabi-gcc", *CPU_FLAGS[v], *flags,
                               f'-DDGST_CPU_NAME="cortex-{v}"', *sources, "--specs=nano.specs",
                               "--specs=rdimon.specs", "-nostartfiles", f"-L{mcu}",
                               "-Wl,--gc-sections", "-T", os.path.join(mcu, "mps2_qemu.ld"),
                               "-o", elf, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"CMSIS-NN reference firmware ({v}) failed to build:\n{proc.stderr[-3000:]}")
        proc = subprocess.run(["qemu-system-arm", "-M", machine, *QEMU_FLAGS, "-kernel", elf],
                              capture_output=True, text=True, timeout=300)
        rows = [dict(zip(("case", "kernel", "instructions", "macs"), m.groups()[:4]))
                for m in LINE.finditer(proc.stdout)]
        bad = [m.group(0) for m in LINE.finditer(proc.stdout) if m.group(7) != "ok"]
        if proc.returncode != 0 or bad or not rows:
            sys.exit(f"CMSIS-NN reference firmware ({v}): exit {proc.returncode}, "
                     f"CMSIS-NN and dgst outputs differ or nothing ran:\n{proc.stdout[-3000:]}")
        for r in rows:
            r["instructions"], r["macs"] = int(r["instructions"]), int(r["macs"])
        results[v] = rows
    settings = {"cmsis_nn": CMSIS_ARCHIVE, "cmsis_sources": list(CMSIS_SOURCES),
                "cmsis_cflags": " ".join(flags[:4]) + " (+ -mcpu/-mfpu as the kernels)",
                "cmsis_requantization": "QuantizeMultiplier(x_scale * weight_scale / (6/255)), "
                                        "output offset -128, activation [-128, 127]"}
    return results, layers, settings


def _cmsis_rows(cmsis: dict, wgrad: list[dict]) -> list[dict]:
    """Per layer: instructions per MAC of the forward 1x1 conv (CMSIS-NN, dgst) and of this
    project's weight gradient on the same layer (sparse, dense), M7 and M4."""
    rows = []
    by = {v: {(r["case"], r["kernel"]): r for r in rows_v} for v, rows_v in cmsis.items()}
    for (case, kernel), r in by["m7"].items():
        if kernel != "cmsis_nn_convolve_1x1_s8":
            continue
        row = {"layer": case, "macs": r["macs"]}
        for v in ("m7", "m4"):
            for kern, key in (("cmsis_nn_convolve_1x1_s8", "cmsis"),
                              ("cmsis_nn_convolve_1x1_s8_fast", "cmsis_fast"),
                              ("dgst_conv2d_s8", "dgst_forward")):
                q = by[v][case, kern]
                row[f"{v}_{key}_per_mac"] = round(q["instructions"] / q["macs"], 3)
        w = next((w for w in wgrad if w["layer"] == case), None)
        if w:
            row["m7_wgrad_sparse_per_mac"] = w["m7_sparse_per_mac"]
            row["m7_wgrad_dense_per_mac"] = w["m7_dense_per_mac"]
            row["m4_wgrad_sparse_per_mac"] = round(w["m4_sparse"] / w["macs_sparse"], 3)
            row["m4_wgrad_dense_per_mac"] = round(w["m4_dense"] / w["macs_dense"], 3)
        rows.append(row)
    return rows


def _cmsis_markdown(rows: list[dict]) -> list[str]:
    md = ["## The practical reference: CMSIS-NN forward 1x1 conv on the same layers "
          "(instructions per MAC)", "",
          "| layer | MACs (dense) | M7 CMSIS-NN arm_convolve_1x1_s8 | M7 ..._fast | "
          "M7 dgst forward | M7 dgst weight grad sparse | M7 dgst weight grad dense | "
          "M4 CMSIS-NN | M4 dgst weight grad sparse, dense |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['layer']} | {r['macs']:,} | {r['m7_cmsis_per_mac']} | "
                  f"{r['m7_cmsis_fast_per_mac']} | {r['m7_dgst_forward_per_mac']} | "
                  f"{r.get('m7_wgrad_sparse_per_mac', '')} | {r.get('m7_wgrad_dense_per_mac', '')}"
                  f" | {r['m4_cmsis_per_mac']} | {r.get('m4_wgrad_sparse_per_mac', '')}, "
                  f"{r.get('m4_wgrad_dense_per_mac', '')} |")
    md += ["", "Same input activations and weights as the training step above; CMSIS-NN's "
           "output equals dgst_conv2d_s8's (TFLite reference arithmetic) bit for bit in the "
           "firmware. A forward MAC and a weight-gradient MAC are the same multiply-add "
           "(both layers' MAC count is H x W x C_in x C_out when dense).", ""]
    return md


def _markdown(table: str, wgrad: list, sparse: list, mem: dict, extra: dict) -> list[str]:
    """The lines of mcu_kernels.md: the results table, then the extra sections."""
    md = [table, "", "## Weight gradient: optimized vs straightforward loop (instructions per MAC)",
          "", "| case | MACs | M7 opt | M7 ref | M4 opt | M4 ref | M7 plain C opt | M7 plain C ref |",
          "|---|---|---|---|---|---|---|---|"]
    for w in wgrad:
        md.append(f"| {w['case']} | {w['macs']} | {w['m7_opt_per_mac']} | {w['m7_ref_per_mac']} "
                  f"| {w['m4_opt_per_mac']} | {w['m4_ref_per_mac']} | "
                  f"{w['m7-nodsp_opt_per_mac']} | {w['m7-nodsp_ref_per_mac']} |")
    md += ["", "## Dense vs sparse weight gradient (same layer, same dy)", "",
           "| layer | k | C_in | ratio | MACs | M7 instructions | M4 instructions | "
           "of dense (M7) | reference loop M7 |", "|---|---|---|---|---|---|---|---|---|"]
    for s in sparse:
        md.append(f"| {s['layer']} | {s['k']} | {s['c_in']} | {s['ratio']} | {s['macs']} | "
                  f"{s['m7_instructions']} | {s['m4_instructions']} | "
                  f"{s['fraction_of_dense']:.1%} | {s['ref_m7_instructions']} |")
    md += ["", "## Memory", "", "| firmware | flash (of 1 MB) | RAM (of 320 KB) | kernel code "
           "(no ref loop) | max kernel stack (measured) | firmware stack peak |",
           "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        m = mem[v]
        md.append(f"| {VARIANTS[v][2]} | {m['flash_bytes']} | {m['ram_bytes']} | "
                  f"{m['kernel_code_total_bytes']} | {extra[v]['kernel_stack_max']} | "
                  f"{extra[v]['firmware_stack_peak']} |")
    md += ["", "Flash holds the test vectors (inputs and expected outputs, most of .rodata); "
           "RAM is .data + .bss (a 100 KB output buffer) + 8 KB heap + 32 KB stack.", "",
           "Kernel code bytes (M7): " + ", ".join(f"{k} {v}" for k, v in
                                                  sorted(mem["m7"]["kernel_code_bytes"].items())),
           "", "Static stack (-fstack-usage, M7, bytes): " + ", ".join(
               f"{k} {v}" for k, v in sorted(mem["m7"]["static_stack_bytes"].items())), ""]
    return md


# ----------------------------------------------------------------------------- --real
WGRAD = {"conv": "conv2d_weight_grad_s8", "depthwise": "depthwise_weight_grad_s8"}
UPDATE = {"conv": "sgd_qas_update_conv_s8", "depthwise": "sgd_qas_update_depthwise_s8"}
IGRAD = {"conv": "conv2d_input_grad_s8", "depthwise": "depthwise_input_grad_s8"}
PARTS = ("loss gradient", "output gradient (mask + quantize)", "weight gradient",
         "bias gradient", "weight update", "bias update", "input gradient")


def export_real(args) -> str:
    """The .npz of --real: the given one, or dgst_tf.tflm_ops.real_vectors' export."""
    if args.real != "export":
        return os.path.abspath(args.real)
    path = os.path.join(REAL_BUILD, f"real_step_{args.image_size}.npz")
    cmd = [sys.executable, "-m", "dgst_tf.tflm_ops.real_vectors", "--out", path,
           "--image-size", str(args.image_size)] + (["--image", args.image] if args.image
                                                    else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"real_vectors.py failed:\n{proc.stderr[-4000:]}")
    print(proc.stdout.strip())
    return path


def _real_layers(npz: str) -> list[dict]:
    import numpy as np
    z = np.load(npz)
    ratio = round(float(z["meta/ratio"]), 6) if "meta/ratio" in z else 0.02
    layers = []
    for name in (str(s) for s in z["meta/layers"]):
        kind = str(z[f"{name}/kind"])
        w = z[f"{name}/w"]
        c_in = int(w.shape[-1])
        layers.append({"layer": name, "kind": kind, "c_in": c_in,
                       "c_out": c_in if kind == "depthwise" else int(w.shape[0]),
                       "kernel": f"{w.shape[1]}x{w.shape[2]}",
                       "feature_map": "x".join(str(v) for v in z[f"{name}/x"].shape[:2]),
                       "k": channels_for_ratio(ratio, c_in),
                       "weight_bytes": int(w.size),
                       "cosine_int8_vs_tf": round(float(z[f"info/cosine/{name}"]), 4)
                       if f"info/cosine/{name}" in z else ""})
    info = {k: str(z[k]) for k in z.files if k.startswith("info/") and z[k].ndim == 0
            and z[k].dtype.kind == "U"}
    info.update({k: float(z[k]) for k in ("info/loss_int8", "info/loss_float") if k in z})
    return layers, ratio, info


def real_parts(index: dict, layers: list[dict]) -> list[dict]:
    """Instructions per (layer, training-step part), sparse (k kept channels) and dense."""
    rows = []
    for L in layers:
        name, kind, k, c_in = L["layer"], L["kind"], L["k"], L["c_in"]
        for v in ("m7", "m4"):
            idx = index[v]

            def get(case, kernel):
                r = idx.get((case, kernel))
                return r["instructions"] if r else None

            dense_parts = [r["instructions"] for (c, kern), r in idx.items()
                           if kern == WGRAD[kind] and re.fullmatch(
                               rf"{re.escape(name)}_k{c_in}(_part\d+)?", c)]
            chain = [get(name, kern) for kern in ("build_mask_s8", "apply_mask_f32",
                                                  "quantize_grad_s8")]
            parts = {
                "loss gradient": (get("loss", "softmax_xent_grad"),) * 2 if L is layers[0]
                else (None, None),
                "output gradient (mask + quantize)": (sum(c or 0 for c in chain),) * 2,
                "weight gradient": (get(f"{name}_k{k}", WGRAD[kind]),
                                    sum(dense_parts) if dense_parts else None),
                "bias gradient": (get(name, "bias_grad_s8"),) * 2,
                "weight update": (get(f"{name}_k{k}", UPDATE[kind]),
                                  get(f"{name}_k{c_in}", UPDATE[kind])),
                "bias update": (get(name, "sgd_qas_update_bias_s32"),) * 2,
                "input gradient": (get(name, IGRAD[kind]),) * 2,
            }
            for part in PARTS:
                sparse, dense = parts[part]
                if part == "loss gradient" and sparse is None:
                    continue
                note = ""
                if part == "weight gradient" and len(dense_parts) > 1:
                    note = f"dense in {len(dense_parts)} chunks of channels (RAM)"
                if part == "weight update" and dense is None:
                    note = (f"dense not run: filter {L['weight_bytes']} B > output buffer; "
                            f"sparse updates the slice w[..., kept]")
                    if sparse:  # per-element loop over the kept channels: linear in k
                        dense = round(sparse * c_in / k)
                        note += "; dense extrapolated x C_in/k"
                if part == "input gradient" and sparse is None:
                    note = ("last layer of the chain: not needed" if L is layers[-1] else
                            "on the host: filter does not fit the flash left")
                row = next((r for r in rows if r["layer"] == name and r["part"] == part), None)
                if row is None:
                    row = {"layer": name, "part": part, "note": note}
                    rows.append(row)
                row[f"{v}_sparse"] = sparse if sparse is not None else ""
                row[f"{v}_dense"] = dense if dense is not None else ""
                if part == "weight update" and "extrapolated" in note:
                    row[f"{v}_dense_extrapolated"] = True
    return rows


def main_real(args):
    npz = export_real(args)
    proc = _host.make("-j2", *[v[0] for v in VARIANTS.values()], f"BUILD={REAL_BUILD}",
                      f"NPZ={npz}", f"PYTHON={sys.executable}")
    if proc.returncode != 0:
        sys.exit(f"make failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    build_dir = os.path.join(REAL_BUILD, "mcu")
    host_only = re.findall(r"gen_vectors: host only: (.*)", proc.stdout)
    results, extra, mem = {}, {}, {}
    for variant in VARIANTS:
        results[variant], extra[variant] = run(variant, build_dir)
        mem[variant] = memory(variant, build_dir)
    index = {v: {(r["case"], r["kernel"]): r for r in rows} for v, rows in results.items()}
    layers, ratio, info = _real_layers(npz)

    rows = []
    for r in results["m7"]:
        if r["kernel"].endswith("/scale"):
            continue
        key = (r["case"], r["kernel"])
        rows.append({"case": r["case"], "kernel": r["kernel"], "k": kept_of(
            re.sub(r"_part\d+$", "", r["case"])), "macs": r["macs"] or "",
            "elements": r["elements"], "m7_instructions": r["instructions"],
            "m7_instr_per_mac": round(r["instructions"] / r["macs"], 3) if r["macs"] else "",
            "m4_instructions": index["m4"][key]["instructions"],
            "m7_plain_c_instructions": index["m7-nodsp"][key]["instructions"],
            "stack_bytes": r["stack"]})
    columns = ["case", "kernel", "k", "macs", "m7_instructions", "m7_instr_per_mac",
               "m4_instructions", "m7_plain_c_instructions", "stack_bytes"]

    parts = real_parts(index, layers)
    totals = {}
    for v in ("m7", "m4"):
        for mode in ("sparse", "dense"):
            totals[f"{v}_{mode}"] = sum(r[f"{v}_{mode}"] or 0 for r in parts)
    # dense vs sparse weight gradient, same layer and dy
    wgrad = []
    for L in layers:
        kind = L["kind"]
        item = {"layer": L["layer"], "kernel": f"{L['kernel']} {kind}",
                "feature_map": L["feature_map"], "c_in": L["c_in"], "c_out": L["c_out"],
                "k_sparse": L["k"]}
        for v in ("m7", "m4", "m7-nodsp"):
            idx = index[v]
            dense = [r for (c, kern), r in idx.items() if kern == WGRAD[kind] and re.fullmatch(
                rf"{re.escape(L['layer'])}_k{L['c_in']}(_part\d+)?", c)]
            sparse = idx[f"{L['layer']}_k{L['k']}", WGRAD[kind]]
            item[f"{v}_sparse"] = sparse["instructions"]
            item[f"{v}_dense"] = sum(r["instructions"] for r in dense)
            if v == "m7":
                item["macs_sparse"] = sparse["macs"]
                item["macs_dense"] = sum(r["macs"] for r in dense)
                item["dense_chunks"] = len(dense)
        item["m7_sparse_per_mac"] = round(item["m7_sparse"] / item["macs_sparse"], 3)
        item["m7_dense_per_mac"] = round(item["m7_dense"] / item["macs_dense"], 3)
        item["sparse_over_dense_m7"] = round(item["m7_sparse"] / item["m7_dense"], 4)
        item["sparse_over_dense_m4"] = round(item["m4_sparse"] / item["m4_dense"], 4)
        wgrad.append(item)

    settings = {"qemu": "qemu-system-arm " + " ".join(QEMU_FLAGS),
                "machines": {v: VARIANTS[v][1] for v in VARIANTS},
                "compiler": subprocess.run(["arm-none-eabi-gcc", "--version"],
                                           capture_output=True, text=True).stdout.splitlines()[0],
                "npz": npz, "ratio": ratio, **info,
                "counting": "instructions = timer0 ticks x 40 / 64 (icount shift 6, 25 MHz timer)",
                "host_only": host_only}
    cmsis, cmsis_layers, cmsis_settings = cmsis_reference(npz)
    settings.update(cmsis_settings)
    table = _report.write("mcu_kernels_real", settings, rows, columns)
    json_path = os.path.join(HERE, "results", "mcu_kernels_real.json")
    with open(json_path) as f:
        payload = json.load(f)
    before_after = _before_after("real", index)
    cmsis_rows = _cmsis_rows(cmsis, wgrad)
    payload.update({"layers": layers, "step_parts": parts, "step_totals": totals,
                    "dense_vs_sparse_weight_grad": wgrad, "memory": mem, "stack": extra,
                    "all_results": results, "before_after": before_after,
                    "cmsis_nn_reference": cmsis_rows, "cmsis_nn_results": cmsis})
    write_atomically(json_path, json.dumps(payload, indent=1))

    md = (_real_markdown(table, layers, parts, totals, wgrad, mem, extra, ratio, host_only)
          + _cmsis_markdown(cmsis_rows) + _before_after_markdown(before_after))
    write_atomically(os.path.join(HERE, "results", "mcu_kernels_real.md"), "\n".join(md))
    print("\n".join(md[md.index("## Layers (real shapes, backward order)"):]))


def _num(v) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _real_markdown(table: str, layers: list, parts: list, totals: dict, wgrad: list, mem: dict,
                   extra: dict, ratio: float, host_only: list) -> list[str]:
    """The lines of mcu_kernels_real.md: the results table, then the extra sections."""
    num = _num
    md = [table, "", "## Layers (real shapes, backward order)", "",
          "| layer | kind | feature map | C_in | C_out | kept k (sparse) | int8 weights (B) | "
          "cosine(int8 dy, TF float gradient) |", "|---|---|---|---|---|---|---|---|"]
    for L in layers:
        md.append(f"| {L['layer']} | {L['kernel']} {L['kind']} | {L['feature_map']} | "
                  f"{L['c_in']} | {L['c_out']} | {L['k']} | {num(L['weight_bytes'])} | "
                  f"{L['cosine_int8_vs_tf']} |")
    md += ["", f"## One training step, per part (instructions; sparse = {ratio:.0%} of the "
           "input channels, dense = all)", "",
           "| layer | part | M7 sparse | M7 dense | M4 sparse | M4 dense | note |",
           "|---|---|---|---|---|---|---|"]
    for r in parts:
        md.append(f"| {r['layer']} | {r['part']} | {num(r['m7_sparse'])} | {num(r['m7_dense'])} "
                  f"| {num(r['m4_sparse'])} | {num(r['m4_dense'])} | {r['note']} |")
    md.append(f"| **step** | **total** | **{num(totals['m7_sparse'])}** | "
              f"**{num(totals['m7_dense'])}** | **{num(totals['m4_sparse'])}** | "
              f"**{num(totals['m4_dense'])}** | dense: with the extrapolated updates; both: without "
              f"the input gradients run on the host |")
    md += ["", "## Dense vs sparse weight gradient (same real layer, same dy)", "",
           "| layer | kernel | map | C_in | C_out | k | MACs sparse / dense | M7 sparse | "
           "M7 dense | sparse / dense (M7) | M4 sparse | M4 dense | M7 instr/MAC sparse, dense "
           "| M7 plain C sparse, dense |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in wgrad:
        md.append(f"| {w['layer']} | {w['kernel']} | {w['feature_map']} | {w['c_in']} | "
                  f"{w['c_out']} | {w['k_sparse']} | {num(w['macs_sparse'])} / "
                  f"{num(w['macs_dense'])} | {num(w['m7_sparse'])} | {num(w['m7_dense'])}"
                  f"{' (' + str(w['dense_chunks']) + ' chunks)' if w['dense_chunks'] > 1 else ''}"
                  f" | {w['sparse_over_dense_m7']:.1%} | {num(w['m4_sparse'])} | "
                  f"{num(w['m4_dense'])} | {w['m7_sparse_per_mac']}, {w['m7_dense_per_mac']} | "
                  f"{num(w['m7-nodsp_sparse'])}, {num(w['m7-nodsp_dense'])} |")
    md += ["", "## Memory", "", "| firmware | flash (of 1 MB) | RAM (of 320 KB) | "
           "max kernel stack | firmware stack peak |", "|---|---|---|---|---|"]
    for v in VARIANTS:
        m = mem[v]
        md.append(f"| {VARIANTS[v][2]} | {num(m['flash_bytes'])} | {num(m['ram_bytes'])} | "
                  f"{extra[v]['kernel_stack_max']} | {extra[v]['firmware_stack_peak']} |")
    md += ["", "Host only: " + ("; ".join(host_only) or "nothing") + ".",
           "A dense weight gradient larger than the firmware's 100 KB output buffer runs in "
           "chunks of input channels (as an MCU with 320 KB RAM must); a conv filter larger "
           "than the buffer is updated on the compact slice w[..., kept], and its dense update "
           "is extrapolated from the sparse one (a per-element loop). QEMU counts "
           "instructions, not cycles.", ""]
    return md


if __name__ == "__main__":
    main()
