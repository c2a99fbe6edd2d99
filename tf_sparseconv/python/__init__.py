"""Implementation of tf_sparseconv's public modules (``tsc.ops``, ``tsc.layers``)."""
