"""Dynamic batching: requests of many adapters and tenants become few, full runs."""
