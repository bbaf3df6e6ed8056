"""The CAT filter's stages, Spark-free: caption parsing and decisions (`captions`, `caption_stage`), the
download stage (`download`: img2dataset), text spotting (`textspot`) and the image stage around it
(`image_stage`), finalisation of stats / ledger checks / report examples (`finalize`), re-deciding
from stored evidence (`redecide`), the funnel report (`report`) and the embedded sample (`sample`).

May import: `schemas`, `pipeline.store`, `pipeline.media`. Never imports `pipeline.distill`, `jobs`
or Spark (jobs/cat_filter.py and jobs/redecide.py wire these functions into Spark tasks)."""
