"""The package's layers hold: inference never loads training, and no module imports upward or closes a cycle.

Layers, bottom to top (a module may import its own layer and the ones below, at module level or inside a function):
math and utilities -> preconditioning, samplers, schedulers -> pipelines -> LoRA -> training -> evaluation -> test kit
-> the digits assets' builders and the commands -> the CLI.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lcm_kit"

LAYERS = [
    ("math and utilities", ["lcm_kit", "lcm_kit.consistency", "lcm_kit.utils", "lcm_kit.digits", "lcm_kit.digits.data"]),
    ("preconditioning, samplers, schedulers", ["lcm_kit.precond", "lcm_kit.sampling", "lcm_kit.schedulers"]),
    ("pipelines", ["lcm_kit.pipelines"]),
    ("LoRA", ["lcm_kit.lora"]),
    ("training", ["lcm_kit.training"]),
    ("evaluation", ["lcm_kit.eval"]),
    ("test kit", ["lcm_kit.testing"]),
    ("digits builders and commands", ["lcm_kit.digits.teacher", "lcm_kit.digits.teacher_report",
                                      "lcm_kit.digits.tokenizer", "lcm_kit.digits.classifier", "lcm_kit.commands"]),
    ("CLI", ["lcm_kit.cli"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    """The index of the layer whose most specific prefix matches ``module``."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def imports_of(module: str) -> set[str]:
    """Every lcm_kit module ``module`` imports, at module level or inside functions (relative imports resolved)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import name`: the submodule pkg.name when it is one, else pkg itself.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "lcm_kit" or t.startswith("lcm_kit."))
    unknown = {t for t in found if t not in MODULES}
    assert not unknown, f"{module} imports modules that do not exist: {sorted(unknown)}"
    return found - {module}


def test_every_module_is_in_a_layer_and_imports_only_its_own_or_lower_layers():
    upward = []
    for module in sorted(MODULES):
        for target in sorted(imports_of(module)):
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that point up:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    graph = {module: imports_of(module) for module in MODULES}
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_the_layer_check_fails_on_an_upward_import(tmp_path, monkeypatch):
    """The check above can fail: a pipeline that imports the training loop is reported."""
    fake = tmp_path / "pipeline_fake.py"
    fake.write_text("from ..training.loop import run_training\n\ndef f():\n    import lcm_kit.cli\n")
    name = "lcm_kit.pipelines.pipeline_fake"
    monkeypatch.setitem(MODULES, name, fake)
    assert {"lcm_kit.training.loop", "lcm_kit.cli"} <= imports_of(name)
    assert layer_of("lcm_kit.training.loop") > layer_of(name)


@pytest.mark.parametrize("folder", ["examples", "train_scripts", "benchmarks"])
def test_scripts_use_the_library_not_the_cli(folder):
    for path in (REPO / folder).glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert "lcm_kit.cli" not in names and "lcm_kit.commands" not in names, path


def test_inference_imports_load_no_training_code():
    """``import lcm_kit`` and its pipelines (what generation needs) load no training module and not ``datasets``."""
    code = (
        "import sys, lcm_kit, lcm_kit.pipelines, lcm_kit.schedulers; lcm_kit.ConsistencyScheduler; lcm_kit.LCMPipeline\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('lcm_kit.training') or m.split('.')[0] == 'datasets')\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
