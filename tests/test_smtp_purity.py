"""The SMTP state machines are sans-I/O: nothing in pymta/smtp/ imports
Twisted or the config schema (module level or inside a function)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pymta.smtp
from pymta.config.model import Limits
from pymta.smtp.server import ProtocolLimits

SMTP = Path(pymta.smtp.__file__).parent
FORBIDDEN = ("twisted", "pymta.config")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:       # relative: resolved inside pymta.smtp
                base = "pymta.smtp" if node.level == 1 else "pymta"
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_smtp_imports_neither_twisted_nor_config():
    modules = sorted(SMTP.glob("*.py"))
    assert len(modules) > 5
    bad = [f"{path.name}:{line}: {name}" for path in modules
           for line, name in _imports(path) if _forbidden(name)]
    assert bad == []


def test_the_check_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from twisted.internet import reactor\n"
                      "    import pymta.config.model\n    from pymta import config\n")
    assert [name for _, name in _imports(module) if _forbidden(name)] == [
        "twisted.internet", "twisted.internet.reactor", "pymta.config.model", "pymta.config"]


def test_protocol_limits_defaults_are_the_config_defaults():
    config = Limits()
    for field in dataclasses.fields(ProtocolLimits):
        assert getattr(ProtocolLimits(), field.name) == getattr(config, field.name), field.name


def test_only_go_assigns_the_state():
    """Both machines change state through their transition table only."""
    for name in ("server.py", "client.py"):
        tree = ast.parse((SMTP / name).read_text())
        assigning = set()
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                if any(isinstance(t, ast.Attribute) and t.attr == "state"
                       and isinstance(t.value, ast.Name) and t.value.id == "self" for t in targets):
                    assigning.add(function.name)
        assert assigning == {"__init__", "_go"}, name
