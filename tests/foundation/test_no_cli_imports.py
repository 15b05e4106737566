"""Library code reports progress through ``sr1.progress``; only ``sr1.cli`` renders it.

Every module under ``sr1/`` outside ``sr1/cli`` is parsed (not imported) and every import
statement in it, at any depth (inside functions and classes too), is checked: none may
import ``sr1.cli`` or rich's console/progress modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sr1

PKG = Path(sr1.__file__).resolve().parent
FORBIDDEN = ("sr1.cli", "rich.console", "rich.progress")


def _library_modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] != "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every module, and every ``from`` member, that ``source`` imports
    anywhere in its tree; relative imports are resolved against ``package``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # from sr1 import cli
    return out


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_the_walk_sees_the_library_and_not_the_cli() -> None:
    names = {_module_name(p) for p in _library_modules()}
    assert {"sr1", "sr1.progress", "sr1.retrieval.index", "sr1.train.trainer"} <= names
    assert not any(n == "sr1.cli" or n.startswith("sr1.cli.") for n in names)


def test_the_check_catches_nested_relative_and_member_imports() -> None:
    src = (
        "def f():\n"
        "    from sr1.cli.common import err_console\n"
        "    class C:\n"
        "        from ..cli import common\n"
        "    from sr1 import cli\n"
        "    import rich.progress\n"
        "    from rich import console\n"
        "    import rich.table\n"
        "    from sr1 import client\n"
    )
    hits = {n for _, n in _imports(src, "sr1.train") if _forbidden(n)}
    assert hits >= {"sr1.cli.common", "sr1.cli", "rich.progress", "rich.console"}
    assert not any(h.startswith(("rich.table", "sr1.client")) for h in hits)


@pytest.mark.parametrize("path", _library_modules(), ids=_module_name)
def test_library_module_imports_no_cli_or_rich_console(path: Path) -> None:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = _imports(path.read_text(encoding="utf-8"), package)
    hits = {(line, mod) for line, mod in found if _forbidden(mod)}
    # `from rich.progress import Progress` names both the module and the member: show the module
    bad = [
        f"line {line}: {mod}"
        for line, mod in sorted(hits)
        if not any(ln == line and mod.startswith(m + ".") for ln, m in hits)
    ]
    assert not bad, (
        f"{name} imports CLI/console modules ({'; '.join(bad)}): take a "
        "sr1.progress.ProgressFactory argument instead; sr1.cli passes rich_progress"
    )
