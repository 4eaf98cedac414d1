"""Active learning: pick the served garments worth labelling (``select``), and the loop
measured on synthetic data (``experiment``)."""
