"""The checked-in generated code must equal a fresh run of protos/generate.py."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "client" / "ortmux" / "v1"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), str(tmp_path)], check=True)
    fresh = tmp_path / "ortmux" / "v1"
    fresh_names = sorted(p.name for p in fresh.iterdir() if p.suffix in {".py", ".pyi"})
    checked_names = sorted(p.name for p in CHECKED_IN.iterdir() if p.suffix in {".py", ".pyi"})
    assert fresh_names == checked_names, "run `make protos` and commit the result"
    differing = [
        name for name in fresh_names if not filecmp.cmp(fresh / name, CHECKED_IN / name, shallow=False)
    ]
    assert differing == [], f"stale generated code {differing}: run `make protos` and commit the result"
