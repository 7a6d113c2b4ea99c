"""The house rules of docs/architecture.md, checked on the source: data flows down the layers of ptray/, and no
module imports, even inside a function, a module that imports it back (no import circle)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PTRAY = ROOT / "ptray"

# Lowest first. A module may import its own layer and the ones below, never one above.
LAYERS = [
    ("base", ["ptray", "ptray.errors", "ptray.seeds", "ptray.files", "ptray.layout", "ptray.cli", "ptray.versions"]),
    ("data", ["ptray.data"]),
    ("config", ["ptray.config", "ptray.plan"]),
    ("lm", ["ptray.lm"]),
    ("training", ["ptray.training"]),
    ("study", ["ptray.study"]),
    ("entry", ["ptray.command", "ptray.__main__", "ptray.train"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PTRAY.rglob("*.py")}


def imports(path: Path, known: set[str], name: str | None = None) -> set[str]:
    """Every ptray module ``path`` (module ``name``) imports, at any level (function bodies included)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{name} is in no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def test_every_module_is_in_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_go_down_the_layers_only():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            if layer_of(dep) > layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(wrong))


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle_in_ptray():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_finds_a_circle_and_a_function_level_import(tmp_path):
    """The checks above can fail: a circle hidden in a function body is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    fake = tmp_path / "probe.py"
    fake.write_text("import os\n\n\ndef f():\n    from ptray.training import loop\n    from . import tokens\n")
    deps = imports(fake, set(modules()), name="ptray.data.probe")
    assert deps == {"ptray.training", "ptray.training.loop", "ptray.data", "ptray.data.tokens"}
    assert layer_of("ptray.training.loop") > layer_of("ptray.data.probe")


@pytest.mark.parametrize("module", ["ptray.config", "ptray.plan", "ptray.cli", "ptray.data.tasks", "ptray.command"])
def test_configs_and_the_command_load_without_torch(module):
    """`ptray --help` and reading a config must not pay for importing torch."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout == "False\n"
