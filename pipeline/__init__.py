"""Library code of the CAT filter and concept distillation. No Spark in here: every module is
importable and unit-testable on its own; jobs/ wires these functions into Spark tasks.

    store/    locations as I/O, input planning, part commits, locks, keys, webdataset   (the ground)
    media/    image decoding, text rendering, the device of a task                      (on store)
    filter/   the CAT filter's stages, finalisation, re-decide, report, sample          (on store, media)
    distill/  concept vocabularies, frozen teachers, sparse top-k labels                (on store, media)

Imports only go down this list (tests/test_layout.py checks it, and that no two files import each other)."""
import os

# Never touch a model hub or the albumentations update check at run time (DESIGN.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
