"""The package's shape: public names keep importing, stages import only earlier stages, no
import cycles, and nothing in the library imports the command line or the jobs."""
import ast
import collections
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (setup.cfg package_dir).
PACKAGE_DIRS = {"dgst_tf": "dgst_tf", "export": "dgst_tf.export", "tflm_ops": "dgst_tf.tflm_ops"}
# Stages in pipeline order: a module may import its own stage and earlier ones only.
STAGES = ["dgst_tf.core", "dgst_tf.models", "dgst_tf.data", "dgst_tf.tflm_ops",
          "dgst_tf.training", "dgst_tf.planning", "dgst_tf.pruning", "dgst_tf.export",
          "dgst_tf.jobs", "dgst_tf.federated", "dgst_tf.cli"]


def _modules() -> dict:
    """Module name -> source path, for every module the wheel installs."""
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package] + parts)] = path
    return modules


def _imported(name: str, path: pathlib.Path, modules: dict) -> set:
    """The project modules ``name`` imports (lazy imports included) and their packages."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets = subs if len(subs) == len(node.names) else [base] + subs
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # importing a.b.c runs a.b's __init__ too
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    found.add(prefix)
    return found


@pytest.fixture(scope="module")
def import_graph():
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _stage(module: str):
    for index, stage in enumerate(STAGES):
        if module == stage or module.startswith(stage + "."):
            return index
    return None


def test_no_import_cycles(import_graph):
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(import_graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(import_graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_each_stage_imports_only_itself_and_earlier_stages(import_graph):
    wrong = []
    for module, targets in import_graph.items():
        own = _stage(module)
        for target in targets:
            other = _stage(target)
            if own is not None and other is not None and other > own:
                wrong.append(f"{module} imports {target} (a later stage)")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_library_never_imports_the_cli_or_the_jobs(import_graph):
    library = [m for m in import_graph if not m.startswith(("dgst_tf.cli", "dgst_tf.jobs"))]
    wrong = [f"{m} imports {t}" for m in library for t in import_graph[m]
             if t.startswith(("dgst_tf.cli", "dgst_tf.jobs"))]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_stage_table_covers_every_subpackage():
    subpackages = {f"dgst_tf.{p.name}" for p in (ROOT / "dgst_tf").iterdir()
                   if (p / "__init__.py").is_file()}
    assert subpackages | {"dgst_tf.export", "dgst_tf.tflm_ops"} == set(STAGES)


PUBLIC_NAMES = [
    ("dgst_tf", ["SparseUpdateModel", "UpdateScheme", "DynamicChannelSelection",
                 "StaticChannelSelection", "fold_batchnorm", "models", "data"]),
    ("dgst_tf.memory", ["training_memory", "MemoryModel", "MemoryReport"]),
    ("dgst_tf.budget", ["MemoryBudget", "check_budget"]),
]


@pytest.mark.parametrize("module,names", PUBLIC_NAMES, ids=[m for m, _ in PUBLIC_NAMES])
def test_public_names_users_already_import_still_import(module, names):
    loaded = importlib.import_module(module)
    for name in names:
        assert getattr(loaded, name, None) is not None, f"{module}.{name} is gone"


@pytest.mark.parametrize("module", ["dgst_tf.export", "dgst_tf.pruning", "dgst_tf.memory",
                                    "dgst_tf.budget", "dgst_tf.training"])
def test_every_name_in_a_public_all_resolves(module):
    loaded = importlib.import_module(module)
    assert loaded.__all__, f"{module} has an empty __all__"
    missing = [name for name in loaded.__all__ if getattr(loaded, name, None) is None]
    assert not missing, f"{module}.__all__ names that do not resolve: {missing}"


def test_numpy_only_parts_import_without_tensorflow():
    code = ("import sys, dgst_tf, dgst_tf.tflm_ops.reference, dgst_tf.core.geometry, "
            "dgst_tf.core.files; print('tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "False", "importing them loaded TensorFlow"


def test_no_module_is_loaded_by_file_path():
    offenders = [str(p.relative_to(ROOT)) for folder in ("dgst_tf", "export", "tflm_ops",
                                                         "tests", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py")
                 if "spec_from_file_location" in p.read_text()]
    offenders = [o for o in offenders if not o.endswith("test_architecture.py")]
    assert not offenders, f"load project modules by import, not by path: {offenders}"


def test_nothing_cites_files_outside_the_repository():
    counts = collections.Counter()
    for path in ROOT.rglob("*"):
        if (path.is_file() and ".venv" not in path.parts and ".git" not in path.parts
                and "build" not in path.parts and path.suffix in {".py", ".md", ".c", ".h",
                                                                   ".cc", ".ipynb", ".inc"}
                and path.name != "test_architecture.py"):
            text = path.read_text(errors="replace")
            for marker in ("REFERENCE.md", "REFERENCE section", "ENVIRONMENT.md"):
                counts[str(path.relative_to(ROOT))] += text.count(marker)
    assert not +counts, f"cites files users cannot see: {dict(+counts)}"
