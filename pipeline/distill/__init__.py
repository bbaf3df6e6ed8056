"""Concept distillation (DiHT), Spark-free: vocabularies of objects and attributes from the filter's
parses (`concepts`), frozen image teachers (`teacher`), linear concept classifiers and sparse top-k
labels (`labels`).

May import: `schemas`, `pipeline.store`, `pipeline.media`; it reads the filter's outputs as tables,
never its code. Never imports `pipeline.filter`, `jobs` or Spark (jobs/distill_labels.py wires it)."""
