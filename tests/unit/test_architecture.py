"""The import contracts of docs/ARCHITECTURE.md hold, and lint-imports really fails on a
violation (checked on a copy of the package with one forbidden import added)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"),
                           "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300,
                          check=False)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "labctl", root / "labctl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("labctl/core/errors.py", "from labctl.state import inventory  # noqa",
     "core and the wire protocols import only core"),
    ("labctl/hosts/agent.py", "from labctl.datastores import service  # noqa",
     "agent-side code never imports controller-side code"),
    ("labctl/lab/bringup.py", "from labctl.drivers import qemu  # noqa",
     "the controller reaches QEMU and LIO only through an agent"),
    ("labctl/datastores/service.py", "from labctl.migration import driver  # noqa",
     "Layers"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, line: str,
                                              contract: str) -> None:
    root = _copy(tmp_path)
    assert _lint(root).returncode == 0
    target = root / module
    text = target.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    target.write_text(head + sep + line + "\n" + rest)
    res = _lint(root)
    assert res.returncode != 0, res.stdout
    broken = res.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, res.stdout
