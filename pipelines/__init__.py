"""Apache Beam pipelines assembled from lorydata blocks (wiring only)."""
