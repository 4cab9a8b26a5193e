"""Generated protobuf and gRPC modules of the Open Inference Protocol (protos/generate.py)."""
