"""The serving stacks fashionserve is measured against by ``fashionserve loadtest bench``.

:mod:`~fashionserve.loadtest.peers.pipeline` is the pipeline's work in one process (the
repository's ONNX files and the project's own steps); :mod:`~fashionserve.loadtest.peers.ray_serve`
serves it with Ray Serve (the ``peers`` extra).
"""
