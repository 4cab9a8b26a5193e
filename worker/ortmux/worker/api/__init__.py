"""The gRPC surface: servicers (protobuf <-> core types), the error table, the server."""
