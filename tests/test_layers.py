"""The layers contract in pyproject.toml: the package keeps it, and an import that climbs breaks it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed")


def _lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under `root`, found there before any installed copy."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True)


def test_package_keeps_its_layers():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, climbing", [
    ("cxr_ldm/models/layers.py", "from cxr_ldm.training import state as _state"),
    ("cxr_ldm/io/weights.py", "from cxr_ldm.data import reports as _reports"),
    ("cxr_ldm/imaging.py", "from cxr_ldm.models import layers as _layers"),
])
def test_an_import_that_climbs_breaks_the_contract(tmp_path, module, climbing):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "cxr_ldm", tmp_path / "cxr_ldm", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    path = tmp_path / module
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(("import ", "from "))
              and not line.startswith("from __future__"))
    path.write_text("\n".join(lines[:at] + [climbing] + lines[at:]) + "\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "1 broken" in result.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> " in result.stdout and f"(l.{at + 1})" in result.stdout, result.stdout
