"""ONNX export, parity, ONNX Runtime sessions and the latency harness; knows nothing of training."""
