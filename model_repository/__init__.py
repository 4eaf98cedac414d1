"""What Triton loads: building the model repository and rolling its versions out.

* :mod:`~fashionserve.model_repository.build` — ``build_repository`` (``fashionserve repo
  build``): the configs that turn the exported models into the ensemble;
* :mod:`~fashionserve.model_repository.settings` — ``RepositorySettings``: flavour, request
  caps, batching, instances (recorded in the ensemble's config);
* :mod:`~fashionserve.model_repository.exported` — a published version's ONNX inputs and
  outputs and manifest, and the sizes the ensemble's models must share;
* :mod:`~fashionserve.model_repository.configs` — config rendering from ``templates/``;
* :mod:`~fashionserve.model_repository.warmup` — the real sample every model runs while
  Triton loads it;
* :mod:`~fashionserve.model_repository.versions` — list, roll out, pin, roll back and prune
  versions (``fashionserve repo versions``);
* :mod:`~fashionserve.model_repository.python_models` — the python-backend models
  (preprocess, crop, the ONNX Runtime runner) and the array logic they run.

The layout on disk (version directories, pins, manifests, atomic publication) belongs to
:mod:`fashionserve.repository`; the ensemble's names to :mod:`fashionserve.ensemble`.
"""
