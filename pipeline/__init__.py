"""Library code of the CAT filter and concept distillation. No Spark in here: every module is
importable and unit-testable on its own; jobs/ wires these functions into Spark tasks."""
import os

# Never touch a model hub or the albumentations update check at run time (DESIGN.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
