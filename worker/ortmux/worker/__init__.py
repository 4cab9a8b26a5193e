"""The ortmux worker: serves ONNX base models and their adapters over gRPC.

Importing this package is cheap; ONNX Runtime is imported only by the modules that run models.
"""
