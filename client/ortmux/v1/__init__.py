"""Generated protobuf and gRPC modules of the ortmux v1 API (protos/generate.py)."""
