"""Generated protobuf and gRPC modules of the KServe v2 protocol (protos/generate.py)."""
