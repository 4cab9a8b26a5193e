"""The audit log: one structured line per adapter registration or deletion and per refused key."""

from __future__ import annotations

import json
import logging

log = logging.getLogger("ortmux.audit")


def audit(event: str, *, tenant: str, result: str, **fields: str) -> None:
    """Log ``event`` (e.g. "adapter.register") with its tenant, outcome ("OK" or a status code
    name) and the objects it touched, as one JSON object on the ``ortmux.audit`` logger."""
    log.info(json.dumps({"event": event, "tenant": tenant, "result": result, **fields}, sort_keys=True))
