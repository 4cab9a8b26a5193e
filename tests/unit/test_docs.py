"""The docs stay true to the code and to each other: the settings reference is what its generator
writes, every relative link resolves (file and heading), and the README stays a front page."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", ROOT / "helm" / "ortmux" / "README.md", *DOCS.rglob("*.md")])

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_settings", DOCS / "generate_settings.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prose(text: str) -> str:
    """The text outside fenced code blocks and code spans, where links live."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, title in HEADING.findall(FENCE.sub("", page.read_text())):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_settings_reference_is_what_the_generator_writes() -> None:
    """Run `.venv/bin/python docs/generate_settings.py` after changing a setting."""
    assert (DOCS / "settings.md").read_text() == generator().render()


def test_settings_reference_has_one_row_per_field_in_declaration_order() -> None:
    from ortmux.worker.settings import Settings

    rows = re.findall(r"^\| `(\w+)` \| `--", (DOCS / "settings.md").read_text(), re.M)
    assert rows == [field.name for field in Settings.fields()]


def test_settings_defaults_read_as_values() -> None:
    module = generator()
    assert module.render_default("models", []) == "(none)"
    assert module.render_default("mix_adapters", True) == "`true`"
    assert module.render_default("data_dir", Path("ortmux-data")) == "`ortmux-data`"
    assert module.render_default("cache_dir", "") == '`""`'
    assert module.render_default("adapter_sync_seconds", 2.0) == "`2`"
    assert module.render_default("max_adapter_bytes", 1 << 30) == "`1073741824` (1 GiB)"
    assert module.render_default("models", [], "Models; repeatable. None: the demo model.") == (
        "(none: the demo model)"
    )
    assert module.render_default("tenant_max_in_flight", 0, "Requests; 0: no quota.") == "`0` (no quota)"
    assert module.render_default("port", 50051, "Port; 0: a free one.") == "`50051`"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, broken


def test_every_doc_is_linked_from_the_readme() -> None:
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for target in LINK.findall(prose((ROOT / "README.md").read_text()))
    }
    assert not [page.name for page in DOCS.glob("*.md") if page not in linked]


def test_module_map_names_modules_that_exist() -> None:
    worker = ROOT / "worker" / "ortmux" / "worker"
    named = set(re.findall(r"`((?:\w+/)+\w+\.py)`", (DOCS / "architecture.md").read_text()))
    assert named
    assert not sorted(name for name in named if not (worker / name).exists() and not (ROOT / name).exists())


def test_module_map_names_every_module() -> None:
    """Every module of the worker's packages is in the map (package __init__ files and the
    generated code aside)."""
    worker = ROOT / "worker" / "ortmux" / "worker"
    named = set(re.findall(r"`((?:\w+/)+\w+\.py)`", (DOCS / "architecture.md").read_text()))
    modules = {
        path.relative_to(worker).as_posix()
        for path in worker.rglob("*.py")
        if path.parent != worker and path.name != "__init__.py" and "inference_v2" not in path.parts
    }
    assert sorted(modules - named) == []


def test_readme_is_a_front_page() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
