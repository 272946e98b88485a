"""pyproject.toml declares every third-party package that omniserve_sgl imports."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "omniserve_sgl"


def _imported_top_level_modules() -> dict[str, set[str]]:
    """Top-level module name -> the files importing it, over every module of the package."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in reqs}


def test_every_imported_package_is_declared():
    dists = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for module, files in _imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module in ("omniserve_sgl", "__future__"):
            continue
        owners = {_norm(d) for d in dists.get(module, [])}
        assert owners, f"{module} (imported by {sorted(files)}) belongs to no installed distribution"
        if not owners & declared:
            missing[module] = (sorted(owners), sorted(files))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"

