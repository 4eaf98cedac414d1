"""The seeded synthetic garment data set the demo models learn from.

No pretrained weights or public data sets can be downloaded where this project is built,
so the demo models learn from scenes rendered here. What is where, bottom up:

* :mod:`~fashionserve.data.catalog`: the products (leaf category, colour, pattern, sleeve,
  details, product-specific looks) and the names the renderer can draw;
* :mod:`~fashionserve.data.drawing`: one garment rasterised as an RGBA patch, and warped;
* :mod:`~fashionserve.data.scenes`: one scene composed (background, clutter, placement,
  occlusion, lighting, noise, JPEG): ``render_scene``, the one way an image is made;
* :mod:`~fashionserve.data.reader`: ``Sample`` (an encoded image with its ground truth) and
  ``read_split``, which reads a written split back;
* :mod:`~fashionserve.data.dataset`: the plan of a data set (catalog, scenes per split) and
  ``render_samples``, a few labelled images rendered in memory without writing a set;
* :mod:`~fashionserve.data.writer`: ``synthesize`` (``fashionserve data synth``), the data
  set written to disk with its COCO-style labels.

The renderer is designed for small CNNs at low resolution (a 256 px letterbox for the
detector, 96 px square crops for the tagger and embedder): every leaf category has a
distinct silhouette, sleeve lengths are drawn unmistakably, colours stay inside their
name's region, and patterns and details are sized relative to the garment so that they
survive a 96 px crop.
"""
