"""The text-spot stage's engines behind one interface: which spotter a task uses, and the rule applied.

    from pipeline.filter.spotting import get_spotter, spot_and_match
    spotter = get_spotter(TextSpotParams())               # the process's spotter for params.engine
    spot_and_match(images, captions, TextSpotParams())   # what the Spark job calls per partition

Engines (TextSpotParams.engine): "easyocr" (pipeline.filter.textspot.TextSpotter) and "ppocr"
(pipeline.filter.ppocr.PPOCRSpotter). Both give per image a list of textspot.Detection (text, conf,
box, line) and count CPU seconds per step in `cpu_seconds`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.filter.ppocr import PPOCRSpotter
from pipeline.filter.textspot import TextSpotParams, TextSpotResult, TextSpotter, _spot_device, caption_match

_SPOTTERS: dict = {}


def make_spotter(params: TextSpotParams, gpu: bool | str | None = None):
    """A new spotter of params.engine: TextSpotter (easyocr) or PPOCRSpotter (ppocr)."""
    if params.engine == "ppocr":
        return PPOCRSpotter(gpu=gpu, params=params)
    return TextSpotter(gpu=gpu, params=params)


def get_spotter(params: TextSpotParams, gpu: bool | str | None = None):
    """The process's spotter (engine per params.engine) for these parameters on this task's device (see
    TextSpotter's gpu): one per device, as a Python worker may run tasks on different GPUs."""
    key = (params, _spot_device(gpu))
    if key not in _SPOTTERS:
        _SPOTTERS[key] = make_spotter(params, gpu=key[1])
    return _SPOTTERS[key]


def spot_and_match(images: Sequence[np.ndarray], captions: Sequence[str | None],
                   params: TextSpotParams | None = None, spotter=None) -> list[TextSpotResult]:
    """Spot text in a partition's decoded images (batched) and apply the caption rule to each pair."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    params = params or (spotter.params if spotter else TextSpotParams())
    spotter = spotter or get_spotter(params)
    results = []
    for detections, caption in zip(spotter.spot(images, captions), captions):
        match = caption_match(detections, caption, min_conf=params.min_conf, min_chars=params.min_chars,
                              blocks=params.match_blocks)
        results.append(TextSpotResult(detections, match))
    return results
