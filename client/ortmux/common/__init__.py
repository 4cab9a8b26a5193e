"""Code shared by the client and the worker: the wire format of tensors and errors."""
