"""Derived inputs that a forward requires beside its main input: a robot policy's state and action chunk
with the images of the VLM inside it, a Q-Former prompt before the image and video probes, spectrogram
frames beside raw audio, audio codebook columns beside the text."""
from __future__ import annotations

import torch

import permgraph as pg
from permgraph.inputs import default_example_inputs

TINY_GEMMA = {"model_type": "gemma", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8}
TINY_BLIP_VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
                    "image_size": 16, "patch_size": 8}
TINY_QFORMER = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                "num_attention_heads": 4, "encoder_hidden_size": 32}


def _moves(spec: pg.PermSpec, param: str) -> bool:
    return any(t.groups() for t in spec.axes_of(param))


def _tiny_pi0():
    from transformers import PI0Config, PI0ForConditionalGeneration

    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 28, "patch_size": 14,
              "vision_use_head": False}
    cfg = PI0Config(vlm_config={"model_type": "paligemma", "text_config": dict(TINY_GEMMA), "vision_config": vision,
                                "projection_dim": 32, "image_token_id": 120},
                    dit_config=dict(TINY_GEMMA), chunk_size=4, max_state_dim=6, max_action_dim=5)
    torch.manual_seed(0)
    return PI0ForConditionalGeneration(cfg).eval()


def test_robot_policy_gets_its_state_and_noise_and_the_images_of_the_vlm_inside_it():
    """PI0 requires the robot's ``state``; it samples the flow's noise and timestep where they are not given
    (derived inputs give them: a fixed output to verify); its images go to the PaliGemma of its
    ``vlm_config``, one per sample with the mask of real cameras, with that VLM's image tokens
    ((28 / 14)^2 = 4 per image) before the text."""
    model = _tiny_pi0()
    inputs = default_example_inputs(model)
    assert inputs["state"].shape == (2, 6) and inputs["noise"].shape == (2, 4, 5)
    assert inputs["timestep"].shape == (2,) and ((inputs["timestep"] > 0) & (inputs["timestep"] < 1)).all()
    assert "actions" not in inputs
    assert inputs["pixel_values"].shape == (2, 1, 3, 28, 28) and inputs["pixel_attention_mask"].all()
    assert (inputs["input_ids"][:, :4] == 120).all() and (inputs["input_ids"] == 120).sum() == 2 * 4
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    spec = pg.compile(model)
    tower = [p for p in spec.shapes if ".vision_tower." in p and p.endswith(("fc1.weight", "fc2.weight"))]
    assert tower and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, promote_float32=True).ok


def _tiny_instructblip(video: bool):
    import transformers

    name = "InstructBlipVideo" if video else "InstructBlip"
    config, model = (getattr(transformers, f"{name}{k}") for k in ("Config", "ForConditionalGeneration"))
    cfg = config(vision_config=dict(TINY_BLIP_VISION), qformer_config=dict(TINY_QFORMER), num_query_tokens=3,
                 text_config={**TINY_GEMMA, "model_type": "opt", "word_embed_proj_dim": 32, "ffn_dim": 48,
                              "num_hidden_layers": 1},
                 **{"video_token_index" if video else "image_token_index": 100})
    torch.manual_seed(0)
    return model(cfg).eval()


def test_qformer_prompt_is_there_before_the_image_probes_so_images_get_their_tokens():
    """InstructBLIP requires ``qformer_input_ids``, which ``get_image_features`` reads too: set before the
    image probes, the images get one token per query (3)."""
    inputs = default_example_inputs(_tiny_instructblip(video=False))
    assert inputs["qformer_input_ids"].shape == (2, 8) and inputs["qformer_attention_mask"].shape == (2, 8)
    assert (inputs["input_ids"] == 100).sum() == 2 * 3


def test_videos_as_the_main_images_with_their_video_tokens():
    """InstructBLIP Video's ``pixel_values`` are videos ``(batch, frames, C, H, W)`` and its placeholders
    video tokens only: 3 queries per frame, 2 frames."""
    model = _tiny_instructblip(video=True)
    inputs = default_example_inputs(model)
    assert inputs["pixel_values"].shape == (2, 2, 3, 16, 16)
    assert (inputs["input_ids"] == 100).sum() == 2 * 2 * 3
    spec = pg.compile(model)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_raw_audio_with_the_spectrogram_frames_a_codec_requires_beside_it():
    """X-Codec 2 reads raw audio (its acoustic encoder) and spectrogram frames (its semantic encoder, a
    Wav2Vec2-BERT reading ``feature_projection_input_dim``-wide frames), joined frame by frame: four hops of
    audio and one frame per hop."""
    from transformers import Xcodec2Config, Xcodec2Model

    semantic = {"model_type": "wav2vec2-bert", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                "num_attention_heads": 4, "feature_projection_input_dim": 20, "output_hidden_size": 32}
    cfg = Xcodec2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=4, head_dim=8, encoder_hidden_size=4, quantization_dim=64,
                        semantic_model_config=semantic)
    torch.manual_seed(0)
    model = Xcodec2Model(cfg).eval()
    inputs = default_example_inputs(model)
    hop = cfg.hop_length
    assert inputs["input_values"].shape == (2, 1, 4 * hop) and inputs["input_features"].shape == (2, 4, 20)
    with torch.no_grad():
        model(**inputs)


def test_text_with_a_column_per_audio_codebook():
    """Kyutai speech-to-text embeds each step's text token and its audio codes: ``(batch, seq, 1 +
    num_codebooks)``, the codes below ``codebook_vocab_size``."""
    from transformers import KyutaiSpeechToTextConfig, KyutaiSpeechToTextForConditionalGeneration

    cfg = KyutaiSpeechToTextConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_codebooks=3,
                                   codebook_vocab_size=16, audio_pad_token_id=64 + 3 * 16,
                                   codec_config={"hidden_size": 32, "num_filters": 4, "upsample_groups": 32,
                                                 "num_hidden_layers": 1, "num_attention_heads": 4,
                                                 "num_key_value_heads": 4, "intermediate_size": 48,
                                                 "head_dim": 8, "codebook_dim": 32})
    torch.manual_seed(0)
    model = KyutaiSpeechToTextForConditionalGeneration(cfg).eval()
    ids = default_example_inputs(model)["input_ids"]
    assert ids.shape == (2, 8, 4) and (ids[..., 1:] < 16).all()
