"""The README's client examples run as written, and the settings reference lists every field."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from ortmux.worker.api.server import Worker
from ortmux.worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SETTINGS_DOC = (ROOT / "docs" / "settings.md").read_text()


def test_readme_client_example_prints_what_readme_says(worker: Worker) -> None:
    code = re.search(r"```python\n(.*?)```", README, re.S)
    assert code, "README has no python example"
    source = code.group(1).replace("localhost:50051", worker.address)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "README.md", "exec"), {})
    expected = re.search(r"it prints\n\n((?:    .*\n)+)", README)
    assert expected
    assert printed.getvalue() == "".join(line[4:] + "\n" for line in expected.group(1).splitlines())


def test_readme_streaming_example_prints_what_readme_says(worker: Worker) -> None:
    section = README[README.index("### Streaming") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.group(1).replace("localhost:50051", worker.address), "README.md", "exec"), {})
    expected = re.search(r"```\n\nprints\n\n((?:    .*\n)+)", section)
    assert expected
    assert printed.getvalue() == "".join(line[4:] + "\n" for line in expected.group(1).splitlines())


def test_readme_settings_table_lists_every_field() -> None:
    for field in Settings.fields():
        assert f"| `{field.name}` |" in SETTINGS_DOC, field.name
        assert f"`ORTMUX_{field.name.upper()}`" in SETTINGS_DOC, field.name
