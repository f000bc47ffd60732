"""The packages' one rule for imports (STYLE.md): neither ``client`` nor
``server`` imports the other, and ``common``, which both use, imports
neither. Every import counts: at the top of a module, inside a function (a
lazy import), relative, or by name through ``importlib``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"client": {"server"}, "server": {"client"}, "common": {"client", "server"}}

# The one allowed arrow. ``fedseg`` is one program with both roles' commands,
# so its entry point ([project.scripts] fedseg = "server.cli:main") adds the
# hospital's commands to the coordinator's. Finding them instead through
# entry-point metadata or importlib by name would hide the same dependency
# from this test and from ruff, and metadata goes stale: run from a checkout,
# an old fedseg.egg-info there shadows the installed package's.
ALLOWED = {("server/cli.py", "client.cli")}

BY_NAME = {"importlib.import_module", "import_module", "__import__"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` (under ``root``) imports, as an absolute dotted name."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            if node.module:
                found.add(".".join([*base, node.module]))
            else:  # from . import name: a module of that package
                found.update(".".join([*base, alias.name]) for alias in node.names)
        elif (isinstance(node, ast.Call) and _dotted(node.func) in BY_NAME and node.args
              and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def arrows() -> set[tuple[str, str]]:
    """(file, module) for every import that crosses between the packages."""
    out = set()
    for package, others in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for module in imported_modules(path):
                if module.split(".")[0] in others:
                    out.add((path.relative_to(ROOT).as_posix(), module))
    return out


def test_neither_side_imports_the_other_and_common_imports_neither():
    crossing = arrows()
    assert crossing - ALLOWED == set(), (
        "give what both sides use a home in common/ instead of importing across")
    assert ALLOWED <= crossing, "an allowed import that is gone: take it off ALLOWED"


@pytest.mark.parametrize(("source", "module"), [
    ("def f():\n    from server.render import console\n", "server.render"),
    ("import server.deployment as d\n", "server.deployment"),
    ("from . import node\n", "client.node"),
    ("import importlib\nimportlib.import_module('server.cli')\n", "server.cli"),
])
def test_lazy_relative_and_by_name_imports_are_seen(tmp_path, source, module):
    (tmp_path / "client").mkdir()
    path = tmp_path / "client" / "probe.py"
    path.write_text(source)
    assert module in imported_modules(path, root=tmp_path)
