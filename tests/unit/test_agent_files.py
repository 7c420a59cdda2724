"""The Python files copied onto a storage node's and a WAN router's config disk are all
their agent needs: each entry module imports from those files alone (no site-packages,
as in the node VM, where labctl is not installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.core.paths import repo_root
from labctl.storage.node import AGENT_FILES as STORAGE_FILES
from labctl.wan.service import AGENT_FILES as ROUTER_FILES


@pytest.mark.parametrize(("files", "module"), [(STORAGE_FILES, "labctl.agents.storage"),
                                               (ROUTER_FILES, "labctl.agents.router")],
                         ids=["storage", "router"])
def test_an_agent_imports_from_its_own_files_alone(files: tuple[str, ...], module: str,
                                                   tmp_path: Path) -> None:
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo_root() / name, tmp_path / name)
    # -S: no site-packages (the installed labctl is not found), -I: no PYTHONPATH, no cwd
    res = subprocess.run([sys.executable, "-S", "-I", "-c",
                          f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import {module}"],
                         capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 0, res.stderr


def test_the_storage_agent_entry_point_takes_its_secret_from_a_file_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """python -m labctl.agents.storage --config F --secret-file S (a machine's systemd
    unit): a config that carries the secret itself, or one that is no JSON object, is
    refused in one line before anything listens."""
    from labctl.agents.storage import main
    from labctl.core.secret import write_secret

    secret = tmp_path / "secret"
    write_secret(secret)
    config = tmp_path / "storage.json"
    config.write_text('{"lab": "l", "node": "n", "secret": "00"}')
    assert main(["--config", str(config), "--secret-file", str(secret)]) == 1
    assert "secrets go in --secret-file and --peer-secret-file only" in capsys.readouterr().err
    config.write_text("[1, 2]")
    assert main(["--config", str(config), "--secret-file", str(secret)]) == 1
    assert "not a JSON object" in capsys.readouterr().err
    config.write_text('{"lab": "l"}')
    assert main(["--config", str(config), "--secret-file", str(tmp_path / "none")]) == 1
    assert "cannot read the lab secret" in capsys.readouterr().err
