"""The layers of docs/architecture.md, checked on the source: imports run one way.

cli (composition root) -> pipelines -> passes/ and export/ -> foundation. The foundation
never imports passes/, export/ or a pipeline; passes/ and export/ import only the
foundation (and themselves); nothing imports the CLI. Imports of fxprune's own modules sit
at module level, where a cycle would show at once instead of hiding in a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# installed name -> source folder (pyproject.toml's package-dir)
PACKAGES = {
    "fxprune.passes": ROOT / "passes",
    "fxprune.export": ROOT / "export",
    "fxprune": ROOT / "fxprune",
}
PIPELINES = {
    "fxprune.analysis",
    "fxprune.prune",
    "fxprune.sparsify",
    "fxprune.saving",
    "fxprune.pretrained",
    "fxprune.parts",
    "fxprune.models",
    "fxprune.backend",
    "fxprune.masks",
    "fxprune.recipes",
}
COMPOSITION = {"fxprune", "fxprune.cli"}


def module_files() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            out.setdefault(name, path)  # fxprune/ does not hold passes/ or export/
    return out


MODULES = module_files()


def layer(name: str) -> str:
    if name in COMPOSITION:
        return "composition"
    if name in PIPELINES:
        return "pipeline"
    if name == "fxprune.passes" or name.startswith("fxprune.passes."):
        return "passes"
    if name == "fxprune.export" or name.startswith("fxprune.export."):
        return "export"
    return "foundation"


ALLOWED = {
    "foundation": {"foundation"},
    "passes": {"foundation", "passes"},
    "export": {"foundation", "export"},
    "pipeline": {"foundation", "passes", "export", "pipeline"},
    "composition": {"foundation", "passes", "export", "pipeline", "composition"},
}


def imports(path: Path, name: str) -> list[tuple[str, int, bool]]:
    """(imported fxprune module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from fxprune import meta` imports the submodule fxprune.meta
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "fxprune" or target.startswith("fxprune."):
                while target not in MODULES and "." in target:
                    target = target.rpartition(".")[0]
                out.append((target, node.lineno, id(node) in top))
    return list(dict.fromkeys(out))


def test_every_module_is_classified():
    assert "fxprune.ops" in MODULES and "fxprune.passes.surgery" in MODULES
    assert "fxprune.export.onnx" in MODULES
    assert set(MODULES) >= PIPELINES, sorted(PIPELINES - set(MODULES))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_one_way(name):
    here = layer(name)
    wrong = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target} ({layer(target)})"
        for target, line, _ in imports(MODULES[name], name)
        if layer(target) not in ALLOWED[here]
    ]
    assert not wrong, f"{name} is in the {here} layer, which may not import:\n" + "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_own_modules_are_imported_at_module_level(name):
    local = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target} inside a function"
        for target, line, at_top in imports(MODULES[name], name)
        if not at_top
    ]
    assert not local, "\n".join(local)


def test_the_check_catches_a_foundation_module_importing_passes(tmp_path):
    # The checker itself can fail: a foundation file that imports a pass is flagged.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fxprune.passes.surgery import SurgeryPass\n")
    found = imports(bad, "fxprune.bad")
    assert found == [("fxprune.passes.surgery", 2, False)]
    assert layer("fxprune.passes.surgery") not in ALLOWED[layer("fxprune.bad")]


MAX_FUNCTION_LINES = 100


def test_no_library_function_is_longer_than_a_screenful():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines"
                    )
    assert not long, "split these functions:\n" + "\n".join(long)
