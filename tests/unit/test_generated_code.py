"""The checked-in generated code must equal a fresh run of protos/generate.py under its pinned
protoc (grpcio-tools 1.72.2, in a venv of its own: ``make test`` builds it and names it in
ORTMUX_PROTOC_PYTHON; without it the test builds one)."""

from __future__ import annotations

import filecmp
import os
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = {  # generated package -> where it is checked in
    "client/ortmux/v1": REPO / "client" / "ortmux" / "v1",
    "worker/ortmux/worker/api/inference_v2": REPO / "worker" / "ortmux" / "worker" / "api" / "inference_v2",
}


@pytest.fixture(scope="session")
def protoc_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    given = os.environ.get("ORTMUX_PROTOC_PYTHON")
    if given:
        return given
    env_dir = tmp_path_factory.mktemp("protoc-venv")
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    tools = ["grpcio-tools==1.72.2", "googleapis-common-protos>=1.66"]
    subprocess.run([python, "-m", "pip", "install", "--quiet", *tools], check=True, timeout=600)
    return python


def test_generated_code_is_up_to_date(tmp_path: Path, protoc_python: str) -> None:
    subprocess.run([protoc_python, str(REPO / "protos" / "generate.py"), str(tmp_path)], check=True)
    for package, checked_in in CHECKED_IN.items():
        fresh = tmp_path / package
        fresh_names = sorted(p.name for p in fresh.iterdir() if p.suffix in {".py", ".pyi"})
        checked_names = sorted(p.name for p in checked_in.iterdir() if p.suffix in {".py", ".pyi"})
        assert fresh_names == checked_names, f"{package}: run `make protos` and commit the result"
        differing = [
            name for name in fresh_names if not filecmp.cmp(fresh / name, checked_in / name, shallow=False)
        ]
        assert differing == [], f"stale generated code {package}: {differing}: run `make protos` and commit"
