"""Pixels and the device that processes them, shared by the filter and distillation: safe image
decoding and JPEG encoding (`images`), text rendered onto photos for labelled sets, the sample and the
experiment's noise model (`render`), and the torch device of a Spark task (`devices`).

May import: `schemas`, `pipeline.store`. Never imports `pipeline.filter`, `pipeline.distill` or Spark."""
