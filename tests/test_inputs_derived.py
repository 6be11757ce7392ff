"""Derived inputs of single-modality models whose layout is not the common one: each runs the forward."""
from __future__ import annotations

import torch

from permgraph.inputs import default_example_inputs


def _runs(model: torch.nn.Module) -> dict:
    inputs = default_example_inputs(model)
    with torch.no_grad():
        model(**inputs)
    return inputs


def test_video_model_gets_a_clip_of_its_frames():
    """VideoMAE reads ``(batch, frames, channels, height, width)``: the config's ``num_frames`` frames."""
    from transformers import VideoMAEConfig, VideoMAEModel

    cfg = VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    inputs = _runs(VideoMAEModel(cfg).eval())
    assert inputs["pixel_values"].shape == (2, 4, 3, 32, 32)
