"""Base models on ONNX Runtime: providers, sessions, validation and the model registry."""
