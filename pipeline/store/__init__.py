"""Where data lives and how it is committed: locations as I/O (`storage`: paths, file://, s3://, any
fsspec protocol), input planning and whole-or-nothing part writes with done markers (`partitions`),
one writer per output folder (`locks`), stable row keys (`keys`), and the webdataset layout
(`webdataset`).

May import: `schemas` and each other in this order (storage <- partitions <- locks, webdataset; keys
stands alone). Never imports `pipeline.media`, `pipeline.filter`, `pipeline.distill` or Spark."""
