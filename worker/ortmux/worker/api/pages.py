"""Pagination of list answers: a page of items after a token, and the token of the next page."""

from __future__ import annotations

from collections.abc import Sequence

from ortmux.worker.adapters.manager import AdapterInfo
from ortmux.worker.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def paginate(items: Sequence[AdapterInfo], page_size: int, token: str) -> tuple[list[AdapterInfo], str]:
    """Items sorted by (model, adapter id) after ``token`` (the last key of the previous page)."""
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after: tuple[str, str] | None = None
    if token:
        model, sep, adapter_id = token.partition("/")
        if not sep:
            raise InvalidArgument(f"page_token {token!r} is not one this worker issued", field="page_token")
        after = (model, adapter_id)
    ordered = sorted(items, key=lambda info: (info.model, info.adapter_id))
    if after is not None:
        ordered = [info for info in ordered if (info.model, info.adapter_id) > after]
    page = ordered[:size]
    next_token = f"{page[-1].model}/{page[-1].adapter_id}" if len(ordered) > size else ""
    return page, next_token
