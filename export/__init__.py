"""Checkpoint to artifacts: ONNX export, parity proof, TensorRT engines.

* :mod:`fashionserve.export.exporter` — ``export_checkpoint`` (the ``fashionserve export``
  command): checkpoint -> ONNX (dynamic batch) -> checks -> parity -> a new model version,
  published with :func:`fashionserve.repository.publish_version`.
* :mod:`fashionserve.export.parity` — runners (PyTorch, ONNX Runtime, TensorRT) and the
  reusable comparison of two runners on the same real inputs, with per-output tolerances.
* :mod:`fashionserve.export.tensorrt` — the TensorRT engine builder and the equivalent
  ``trtexec`` command.

Nothing is imported here, so ``import fashionserve.export`` stays cheap (PyTorch loads on
first use).
"""
