"""The audit log: one structured line per adapter registration or deletion and per refused key."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

from ortmux.worker.errors import WorkerError

log = logging.getLogger("ortmux.audit")


def audit(event: str, *, tenant: str, result: str, **fields: str) -> None:
    """Log ``event`` (e.g. "adapter.register") with its tenant, outcome ("OK" or a status code
    name) and the objects it touched, as one JSON object on the ``ortmux.audit`` logger."""
    log.info(json.dumps({"event": event, "tenant": tenant, "result": result, **fields}, sort_keys=True))


def outcome(error: BaseException | None) -> str:
    """A call's outcome as a status code name: OK, the error's code, or INTERNAL."""
    if error is None:
        return "OK"
    return error.code.name if isinstance(error, WorkerError) else "INTERNAL"


@contextlib.contextmanager
def audited(event: str, tenant: str, model: str, adapter_id: str, **fields: str) -> Iterator[None]:
    """Audit ``event`` once the block is done, with its outcome."""
    try:
        yield
    except BaseException as error:
        audit(event, tenant=tenant, result=outcome(error), model=model, adapter=adapter_id, **fields)
        raise
    audit(event, tenant=tenant, result="OK", model=model, adapter=adapter_id, **fields)
