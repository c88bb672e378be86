"""Errors of the export stage: a model that cannot be exported, a file that is not the model, a runtime mismatch.

export/ knows nothing of the CLI; suite/ maps these onto its own error classes (one line, non-zero exit).
"""


class ExportError(Exception):
    """An export failed, or an ONNX file is missing, corrupt or was exported from another model."""


class ParityError(ExportError):
    """ONNX Runtime and PyTorch disagree on the same inputs beyond the tolerance."""


class SessionError(ExportError):
    """An ONNX Runtime session could not be created as asked (e.g. CUDA asked for but not available)."""
