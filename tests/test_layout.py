"""Package layout contracts: the runtime never imports model code; the import names are namespaced."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append("." * node.level + node.module)
    return names


def test_runtime_sources_import_no_builder_or_model_code() -> None:
    files = sorted((REPO / "runtime").rglob("*.py"))
    assert files, "runtime/ has no sources"
    for f in files:
        for name in _imports(f):
            assert "builder" not in name and "ltx_core" not in name and "transformers" not in name, (f, name)


def test_importing_the_runtime_loads_no_builder_module() -> None:
    code = "import sys, fvrt, fvrt.runtime; print(sorted(m for m in sys.modules if 'builder' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_packages_install_under_the_fvrt_namespace() -> None:
    import fvrt.builder
    import fvrt.plugins
    import fvrt.runtime

    for mod in (fvrt.builder, fvrt.runtime, fvrt.plugins):
        assert mod.__name__.startswith("fvrt.")
