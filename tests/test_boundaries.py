"""Architecture rules: the edge SDK never imports the hub, and the wire stays torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_ffm_edge_never_imports_ffm_hub() -> None:
    files = sorted((ROOT / "ffm_edge").rglob("*.py"))
    assert len(files) > 10
    offenders = {
        str(f.relative_to(ROOT)): sorted(m for m in imported_modules(f) if m.split(".")[0] == "ffm_hub") for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}


def test_wire_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now fails
        "import ffm_edge.wire, ffm_edge.transport, ffm_edge.outbox\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
