"""Exporters: what leaves nmgraph for other runtimes and for disk.

:mod:`~nmgraph.exporters.onnx_export` (``nmgraph.export``: ONNX verified against onnxruntime, or a
TensorRT engine), :mod:`~nmgraph.exporters.onnx_check` (reads an ONNX graph the way TensorRT does and
says which weights keep their N:M pattern), :mod:`~nmgraph.exporters.tensorrt` (TensorRT and
Torch-TensorRT builds) and :mod:`~nmgraph.exporters.serialize` (``nmgraph.save`` / ``nmgraph.load``:
the compressed checkpoint format). Named ``exporters`` because ``nmgraph.export`` is the function.
"""
