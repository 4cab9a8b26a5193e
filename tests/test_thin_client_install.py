"""`pip install .` with no extras gives a working client and no ONNX Runtime."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_install_imports_the_client_without_onnxruntime(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO)],
        check=True,
        timeout=600,
    )
    probe = (
        "import importlib.util, ortmux.client as c;"
        "from ortmux.client import Client, AsyncClient, OrtmuxError;"
        "assert importlib.util.find_spec('onnxruntime') is None, 'onnxruntime is installed';"
        "assert importlib.util.find_spec('onnx') is None, 'onnx is installed';"
        "import sys; assert 'onnxruntime' not in sys.modules;"
        "print(sorted(c.__all__))"
    )
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Client" in result.stdout
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    assert "onnxruntime" not in listed
    assert "prometheus" not in listed
