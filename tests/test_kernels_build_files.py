"""BUILD (Bazel) and tflm_ops/dgst_train_kernels.inc (TFLM's Makefile build) name exactly
the training-kernel sources that exist, and every core under tflm_ops/core is in both; their
TFLM source-tree-mode kernel lists name every tflm_ops/tflm kernel, and dgst_train_ops.h
declares and registers every op those kernels define."""
import ast
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INC = os.path.join(ROOT, "tflm_ops", "dgst_train_kernels.inc")
CORE = os.path.join(ROOT, "tflm_ops", "core")
TFLM = os.path.join(ROOT, "tflm_ops", "tflm")


def build_file_sources():
    """Every quoted .c/.cc/.h path in BUILD's srcs / hdrs / textual_hdrs lists."""
    with open(os.path.join(ROOT, "BUILD")) as f:
        text = f.read()
    paths = []
    for block in re.finditer(r"\b(?:srcs|hdrs|textual_hdrs)\s*=\s*\[(.*?)\]", text, re.S):
        paths += re.findall(r'"([^"]+\.(?:c|cc|h))"', block.group(1))
    return text, paths


def test_build_globs_match_files():
    """No placeholder globs: every glob pattern in BUILD matches at least one file."""
    text, _ = build_file_sources()
    patterns = [p for g in re.finditer(r"glob\(\[(.*?)\]", text, re.S)
                for p in re.findall(r'"([^"]+)"', g.group(1))]
    for pattern in patterns:
        assert glob.glob(os.path.join(ROOT, pattern)), f"BUILD glob {pattern!r} matches nothing"


def inc_variables(tmp_path):
    """The .inc's variables as make evaluates them (included from another directory)."""
    mk = tmp_path / "print.mk"
    mk.write_text(f"include {INC}\n"
                  "print:\n"
                  "\t@echo SRCS=$(DGST_TRAIN_KERNEL_SRCS)\n"
                  "\t@echo REF=$(DGST_TRAIN_KERNEL_REF_SRCS)\n"
                  "\t@echo HDRS=$(DGST_TRAIN_KERNEL_HDRS)\n"
                  "\t@echo INCLUDES=$(DGST_TRAIN_KERNEL_INCLUDES)\n"
                  "\t@echo TFLM_SRCS=$(DGST_TRAIN_TFLM_SRCS)\n"
                  "\t@echo TFLM_HDRS=$(DGST_TRAIN_TFLM_HDRS)\n"
                  "\t@echo TFLM_INCLUDES=$(DGST_TRAIN_TFLM_INCLUDES)\n"
                  "\t@echo TFLM_CXXFLAGS=$(DGST_TRAIN_TFLM_CXXFLAGS)\n")
    proc = subprocess.run(["make", "-s", "-f", str(mk), "print"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        out[key] = value.split()
    return out


def core_files(ext):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CORE, f"*.{ext}")))


def test_build_names_only_existing_files_and_every_core():
    text, paths = build_file_sources()
    assert "cc_library(" in text and paths
    missing = [p for p in paths if not os.path.isfile(os.path.join(ROOT, p))]
    assert not missing, f"BUILD names files that do not exist: {missing}"
    for f in core_files("c") + core_files("h"):
        assert f in paths, f"{f} is not named in BUILD"


def test_inc_names_only_existing_files_and_every_core(tmp_path):
    if shutil.which("make") is None:
        pytest.fail("make is required")
    v = inc_variables(tmp_path)
    named = v["SRCS"] + v["REF"] + v["HDRS"]
    assert v["SRCS"] and v["HDRS"] and v["INCLUDES"]
    missing = [p for p in named if not os.path.isfile(p)]
    assert not missing, f"dgst_train_kernels.inc names files that do not exist: {missing}"
    named = {os.path.relpath(os.path.realpath(p), ROOT) for p in named}
    for f in core_files("c") + core_files("h"):
        assert f in named, f"{f} is not named in dgst_train_kernels.inc"
    assert not set(v["SRCS"]) & set(v["REF"])  # the reference loop is kept apart


def test_inc_sources_compile_as_c99(tmp_path):
    """What a TFLM Makefile build does with the .inc: compile its sources with its flags."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is required")
    mk = tmp_path / "lib.mk"
    mk.write_text(f"include {INC}\n"
                  "OBJS := $(notdir $(DGST_TRAIN_KERNEL_SRCS:.c=.o))\n"
                  "vpath %.c $(sort $(dir $(DGST_TRAIN_KERNEL_SRCS)))\n"
                  "libdgst.a: $(OBJS)\n\tar rcs $@ $^\n"
                  "%.o: %.c\n\tgcc -std=c99 -O1 -Wall -Wextra -Werror -Wpedantic "
                  "$(DGST_TRAIN_KERNEL_CFLAGS) $(DGST_TRAIN_KERNEL_INCLUDES) -c $< -o $@\n")
    proc = subprocess.run(["make", "-s", "-j2", "-f", str(mk)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    symbols = subprocess.run(["nm", "-g", "--defined-only", str(tmp_path / "libdgst.a")],
                             capture_output=True, text=True).stdout
    header = open(os.path.join(CORE, "dgst_train_kernels.h")).read()
    for name in re.findall(r"\b(dgst_\w+)\(", header):
        assert re.search(rf"\bT {name}\b", symbols), f"{name} is not defined by the .inc sources"


def tflm_files(ext):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(TFLM, f"*.{ext}")))


def test_inc_names_every_tflm_kernel_for_tree_mode(tmp_path):
    if shutil.which("make") is None:
        pytest.fail("make is required")
    v = inc_variables(tmp_path)
    srcs = sorted(os.path.relpath(os.path.realpath(p), ROOT) for p in v["TFLM_SRCS"])
    hdrs = sorted(os.path.relpath(os.path.realpath(p), ROOT) for p in v["TFLM_HDRS"])
    assert srcs == tflm_files("cc")
    assert hdrs == tflm_files("h")
    assert v["TFLM_INCLUDES"] and "-DDGST_TFLM_TREE" in v["TFLM_CXXFLAGS"]


def test_build_tree_mode_library_names_every_tflm_kernel():
    text, _ = build_file_sources()
    match = re.search(r'cc_library\(\s*name = "dgst_tflm_train_ops",(.*?)\n\)', text, re.S)
    assert match, "BUILD has no cc_library dgst_tflm_train_ops"
    block = match.group(1)
    named = set(re.findall(r'"(tflm_ops/tflm/[^"]+)"', block))
    assert named == set(tflm_files("cc") + tflm_files("h"))
    assert re.search(r'defines = \["DGST_TFLM_TREE"\]', block)
    assert '"//tensorflow/lite/micro/kernels:kernel_util"' in block
    assert '":dgst_train_kernels_core"' in block


def test_train_ops_header_registers_every_op():
    """Every kernel file ends with one DGST_REGISTER_OP; dgst_train_ops.h declares its
    Register_<OP> and AddDgstTrainOps adds it under its name; the ops are the loader's OPS."""
    ops = []
    for path in tflm_files("cc"):
        if path.endswith("dgst_tflm_abi.cc"):
            continue
        found = re.findall(r"^DGST_REGISTER_OP\((\w+),", open(os.path.join(ROOT, path)).read(),
                           re.M)
        assert len(found) == 1, f"{path}: expected one DGST_REGISTER_OP, got {found}"
        ops += found
    header = open(os.path.join(TFLM, "dgst_train_ops.h")).read()
    for op in ops:
        assert f"TFLMRegistration* Register_{op}();" in header, op
        assert f'{{"{op}", tflite::Register_{op}}}' in header, op
    assert f"kNumDgstTrainOps = {len(ops)};" in header
    loader = ast.parse(open(os.path.join(ROOT, "export", "tflm", "ops_loader.py")).read())
    loader_ops = next(ast.literal_eval(node.value) for node in loader.body
                      if isinstance(node, ast.Assign)
                      and any(getattr(t, "id", None) == "OPS" for t in node.targets))
    assert sorted(ops) == sorted(loader_ops)
