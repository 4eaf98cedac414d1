"""Training of the reference detector, tagger and embedder on a ``data synth`` directory.

* :mod:`~fashionserve.train.data`: the splits decoded into memory, augmentation, and the
  batches each model learns from;
* :mod:`~fashionserve.train.loops`: the three training loops and their schedules;
* :mod:`~fashionserve.train.validation`: the served path in PyTorch, through the serving
  steps' own functions, scored like ``fashionserve evaluate``;
* :mod:`~fashionserve.train.run`: :func:`train_all`, one run from data to checkpoints
  (what ``fashionserve train`` and ``fashionserve serve`` call).
"""

from fashionserve.train.run import train_all

__all__ = ["train_all"]
