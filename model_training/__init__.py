"""The bundled PyTorch trainer: data, models, objectives, evaluation."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
