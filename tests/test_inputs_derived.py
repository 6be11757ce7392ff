"""Derived inputs of single-modality models whose layout is not the common one: each runs the forward."""
from __future__ import annotations

import torch

import permgraph as pg
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


def test_conformer_encoder_gets_frames_first_features():
    """Parakeet's encoder reads ``(batch, frames, mels)``: the Whisper layout fails its forward, so the
    frames-first one is kept."""
    from transformers import ParakeetEncoder, ParakeetEncoderConfig

    cfg = ParakeetEncoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                num_mel_bins=16, subsampling_conv_channels=8)
    inputs = _runs(ParakeetEncoder(cfg).eval())
    assert inputs["input_features"].shape == (2, 64, 16)


def test_ctc_head_reads_mel_bins_from_its_encoder_config():
    """LASR's CTC model keeps ``num_mel_bins`` on its ``encoder_config``, not on the outer config."""
    from transformers import LasrCTCConfig, LasrForCTC

    cfg = LasrCTCConfig(vocab_size=32, encoder_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                       "num_attention_heads": 2, "intermediate_size": 48,
                                                       "num_mel_bins": 24, "subsampling_conv_channels": 8})
    inputs = _runs(LasrForCTC(cfg).eval())
    assert inputs["input_features"].shape == (2, 64, 24)


def test_whisper_keeps_mels_first_features():
    """Whisper's layout, ``(batch, mels, 2 x max_source_positions)``, runs its forward and stays."""
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=16,
                        max_source_positions=20, max_target_positions=32, vocab_size=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    inputs = _runs(WhisperModel(cfg).eval())
    assert inputs["input_features"].shape == (2, 16, 40)


def test_multi_image_vlm_gets_images_per_sample():
    """Idefics2 reads ``(batch, images, C, S, S)``: one image per sample, its tokens in the text."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    cfg = Idefics2Config(
        image_token_id=60,
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 48,
                       "image_size": 32, "patch_size": 8},
        perceiver_config={"hidden_size": 32, "resampler_n_latents": 4, "resampler_depth": 1, "resampler_n_heads": 2,
                          "resampler_head_dim": 8, "num_key_value_heads": 1},
        text_config={"model_type": "mistral", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "intermediate_size": 48, "vocab_size": 64})
    torch.manual_seed(0)
    inputs = _runs(Idefics2ForConditionalGeneration(cfg).eval())
    assert inputs["pixel_values"].shape == (2, 1, 3, 32, 32)
    assert (inputs["input_ids"] == 60).sum() == 2 * 4  # the perceiver's latents per image


def test_naflex_vision_model_gets_patchified_images():
    """SigLIP 2 reads already patchified images ``(batch, patches, C * P * P)`` with the grid they form
    (``spatial_shapes``) and a mask of the real patches: ``num_patches`` as a square grid."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    cfg = Siglip2VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                              num_patches=16, patch_size=4)
    inputs = _runs(Siglip2VisionModel(cfg).eval())
    assert inputs["pixel_values"].shape == (2, 16, 3 * 4 * 4)
    assert inputs["spatial_shapes"].tolist() == [[4, 4], [4, 4]]
    assert inputs["pixel_attention_mask"].shape == (2, 16) and bool(inputs["pixel_attention_mask"].all())


def test_vlm_built_without_its_vision_tower_gets_text_only():
    """Gemma 4's default config has no vision tower (``vision_config=None``): no pixel_values, text runs."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    cfg = Gemma4Config(text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 48,
                                    "vocab_size": 64, "vocab_size_per_layer_input": 64,
                                    "hidden_size_per_layer_input": 8, "layer_types": ["full_attention"]})
    assert cfg.vision_config is None
    inputs = _runs(Gemma4ForConditionalGeneration(cfg).eval())
    assert "pixel_values" not in inputs and inputs["input_ids"].shape == (2, 8)


def test_vision_tower_gets_patches_with_their_positions():
    """Gemma 4's vision tower reads patchified images with each patch's (column, row): a grid two pooling
    kernels a side, pooled into 2 x 2 tokens per image."""
    from transformers import Gemma4VisionConfig, Gemma4VisionModel

    cfg = Gemma4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                             head_dim=16, intermediate_size=48, patch_size=4, pooling_kernel_size=2,
                             position_embedding_size=16)
    inputs = _runs(Gemma4VisionModel(cfg).eval())
    assert inputs["pixel_values"].shape == (2, 16, 3 * 4 * 4)
    assert inputs["pixel_position_ids"][0, :5].tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1]]


def test_vision_tower_on_its_own_gets_flattened_patches_with_their_grid():
    """Qwen2.5-VL's vision tower reads flattened patches ``(images * s^2, C * T * P * P)`` with each image's
    grid ``grid_thw`` (``s`` two merge windows): it compiles from the plain call, its blocks and merger
    move, and the spec is sound."""
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    import permgraph as pg

    cfg = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4,
                                 spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=24,
                                 fullatt_block_indexes=[1], window_size=16)
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg).eval().double()
    inputs = _runs(model)
    assert inputs["hidden_states"].shape == (2 * 16, 3 * 2 * 4 * 4)
    assert inputs["grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    spec = pg.compile(model)
    moving = {p for p in spec.shapes if any(t.groups() for t in spec.axes_of(p))}
    assert any(p.startswith("merger.mlp.") for p in moving) and any(".mlp.up_proj." in p for p in moving)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_vision_tower_with_an_unflattened_patch_embedding_gets_its_layout():
    """Kimi-K2.5's tower embeds patches with a convolution: its flattened patches are ``(n, C, P, P)``,
    the layout the forward runs on after the flat rows fail."""
    from transformers import Kimi_K25VisionConfig, Kimi_K25VisionModel

    cfg = Kimi_K25VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                               patch_size=4)
    torch.manual_seed(0)
    inputs = _runs(Kimi_K25VisionModel._from_config(cfg).eval())
    assert inputs["pixel_values"].shape[1:] == (3, 4, 4)
    assert inputs["pixel_values"].shape[0] == int(inputs["grid_thw"].prod(-1).sum())


def test_video_classifier_gets_a_clip_of_its_frames_per_clip():
    """V-JEPA 2 reads ``pixel_values_videos`` (its main input) of ``frames_per_clip`` frames of ``crop_size``."""
    from transformers import VJEPA2Config, VJEPA2ForVideoClassification

    cfg = VJEPA2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0, crop_size=16,
                       patch_size=8, frames_per_clip=4, tubelet_size=2, pred_hidden_size=16,
                       pred_num_hidden_layers=1, pred_num_attention_heads=2, num_labels=3)
    inputs = _runs(VJEPA2ForVideoClassification(cfg).eval())
    assert inputs["pixel_values_videos"].shape == (2, 4, 3, 16, 16)


def test_time_series_models_get_their_history_in_the_layout_they_read():
    """PatchTST reads ``past_values`` ``(batch, context, channels)`` and compiles soundly; TimesFM reads
    ``(batch, context)`` with its padding and frequency class, which its forward requires."""
    from transformers import PatchTSTConfig, PatchTSTModel, TimesFmConfig, TimesFmModel

    import permgraph as pg

    cfg = PatchTSTConfig(num_input_channels=3, context_length=32, patch_length=8, patch_stride=8, d_model=16,
                         num_attention_heads=2, num_hidden_layers=1, ffn_dim=24)
    torch.manual_seed(0)
    model = PatchTSTModel(cfg).eval().double()
    assert _runs(model)["past_values"].shape == (2, 32, 3)
    spec = pg.compile(model)
    assert any(t.groups() for p in spec.shapes for t in spec.axes_of(p))
    assert pg.verify(model, spec, promote_float32=True).ok
    cfg = TimesFmConfig(patch_length=8, context_length=32, horizon_length=8, hidden_size=16, intermediate_size=24,
                        num_hidden_layers=1, num_attention_heads=2, head_dim=8)
    inputs = _runs(TimesFmModel(cfg).eval())
    assert inputs["past_values"].shape == (2, 32) and inputs["freq"].shape == (2, 1)
    assert not inputs["past_values_padding"].any()



def test_lagged_forecaster_gets_its_lagged_history_and_future():
    """The Time Series Transformer looks back ``max(lags)`` steps before its context: ``past_values`` of
    ``context + max(lags)`` steps with their time features and observed mask; its decoder reads the
    ``prediction_length`` future steps; the encoder's and decoder's MLP units move."""
    from transformers import TimeSeriesTransformerConfig, TimeSeriesTransformerModel

    import permgraph as pg

    cfg = TimeSeriesTransformerConfig(prediction_length=4, context_length=6, lags_sequence=[1, 2, 3],
                                      num_time_features=2, d_model=16, encoder_layers=1, decoder_layers=1,
                                      encoder_ffn_dim=24, decoder_ffn_dim=24, encoder_attention_heads=2,
                                      decoder_attention_heads=2)
    torch.manual_seed(0)
    model = TimeSeriesTransformerModel(cfg).eval().double()
    inputs = _runs(model)
    assert inputs["past_values"].shape == (2, 9) and inputs["past_time_features"].shape == (2, 9, 2)
    assert inputs["future_time_features"].shape == (2, 4, 2)
    spec = pg.compile(model)
    assert all(any(t.groups() for t in spec.axes_of(f"{part}.layers.0.fc1.weight")) for part in ("encoder", "decoder"))
    assert pg.verify(model, spec, promote_float32=True).ok

def test_spectrogram_encoder_that_reads_its_optional_frame_mask_gets_one():
    """AudioFlamingo 3's encoder declares ``input_features_mask`` optional but reads it: with no layout
    running without it, the layouts are tried again with an all-ones mask."""
    from transformers import AudioFlamingo3Encoder, AudioFlamingo3EncoderConfig

    import permgraph as pg

    cfg = AudioFlamingo3EncoderConfig(d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=48,
                                      num_mel_bins=16, max_source_positions=20)
    torch.manual_seed(0)
    model = AudioFlamingo3Encoder(cfg).eval()
    inputs = _runs(model)
    assert inputs["input_features"].shape == (2, 16, 40) and inputs["input_features_mask"].shape == (2, 40)
    assert inputs["input_features_mask"].all()
    spec = pg.compile(model)
    assert any(t.groups() for t in spec.axes_of("layers.0.fc1.weight"))
    assert pg.verify(model, spec, promote_float32=True).ok


def test_audio_encoder_reading_mel_frames_gets_them_with_an_empty_padding_mask():
    """Gemma 3n's audio encoder: ``audio_mel`` ``(batch, frames, mels)``; ``audio_mel_mask`` True is padding."""
    from transformers import Gemma3nAudioConfig, Gemma3nAudioEncoder

    cfg = Gemma3nAudioConfig(hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=1,
                             input_feat_size=16, sscp_conv_channel_size=[8, 8])
    inputs = _runs(Gemma3nAudioEncoder(cfg).eval())
    assert inputs["audio_mel"].shape == (2, 64, 16) and not inputs["audio_mel_mask"].any()


def test_audio_models_get_input_values_in_the_layout_they_read():
    """``input_values`` is raw audio ``(batch, samples)`` for wav2vec 2.0, ``(batch, channels, samples)``
    for codecs (DAC) and a spectrogram ``(batch, max_length, mels)`` for the Audio Spectrogram Transformer."""
    from transformers import ASTConfig, ASTForAudioClassification, DacConfig, DacModel

    ast = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, max_length=64,
                    num_mel_bins=16, patch_size=8, frequency_stride=8, time_stride=8)
    assert _runs(ASTForAudioClassification(ast).eval())["input_values"].shape == (2, 64, 16)
    dac = DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 2], decoder_hidden_size=16, hidden_size=16,
                    n_codebooks=2, codebook_size=16, codebook_dim=4)
    assert _runs(DacModel(dac).eval())["input_values"].shape == (2, 1, 1024)


def test_layout_model_gets_word_boxes_and_its_box_embeddings_move():
    """LayoutLM reads word boxes ``bbox`` ``(batch, seq, 4)`` on the 0-1000 page grid: derived inputs give
    valid ones (``x0 <= x1``, ``y0 <= y1``), so its box embeddings are in the traced forward and move with
    the residual stream."""
    from transformers import LayoutLMConfig, LayoutLMForMaskedLM

    import permgraph as pg

    cfg = LayoutLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, max_2d_position_embeddings=1024)
    torch.manual_seed(0)
    model = LayoutLMForMaskedLM(cfg).eval().double()
    box = _runs(model)["bbox"]
    assert box.shape == (2, 8, 4) and bool((box[..., 2:] >= box[..., :2]).all()) and int(box.max()) <= 1000
    spec = pg.compile(model)
    assert any(t.groups() for t in spec.axes_of("layoutlm.embeddings.x_position_embeddings.weight"))
    assert pg.verify(model, spec, promote_float32=True).ok


def test_images_sized_by_an_encoder_sub_config_and_non_square_images():
    """A vision encoder-decoder's images are sized by its ``encoder`` config (ViT's 32 x 32); MGP-STR's
    ``image_size`` is ``(height, width)``: its images are not square."""
    from transformers import (
        BertConfig,
        MgpstrConfig,
        MgpstrForSceneTextRecognition,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                    image_size=32, patch_size=8)
    bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=48, is_decoder=True, add_cross_attention=True)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, bert)
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    assert _runs(VisionEncoderDecoderModel(cfg).eval())["pixel_values"].shape == (2, 3, 32, 32)
    mgp = MgpstrConfig(image_size=[16, 32], patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_token_length=8)
    assert _runs(MgpstrForSceneTextRecognition(mgp).eval())["pixel_values"].shape == (2, 3, 16, 32)


def test_speech_encoder_decoder_gets_its_encoders_input_as_inputs():
    """SpeechEncoderDecoder's main input is ``inputs``: its encoder's (wav2vec 2.0's raw audio), with decoder
    ids from its decoder's vocabulary; the spec is sound and the encoder's feed-forward units move."""
    from transformers import BertConfig, SpeechEncoderDecoderConfig, SpeechEncoderDecoderModel, Wav2Vec2Config

    import permgraph as pg

    w2v = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=2, vocab_size=16)
    bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=48, is_decoder=True, add_cross_attention=True)
    cfg = SpeechEncoderDecoderConfig.from_encoder_decoder_configs(w2v, bert)
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    torch.manual_seed(0)
    model = SpeechEncoderDecoderModel(cfg).eval().double()
    inputs = _runs(model)
    assert inputs["inputs"].shape == (2, 1024) and int(inputs["decoder_input_ids"].max()) < 64
    spec = pg.compile(model)
    assert any(t.groups() for t in spec.axes_of("encoder.encoder.layers.0.feed_forward.intermediate_dense.weight"))
    assert pg.verify(model, spec, promote_float32=True).ok


def test_text_tower_with_a_vision_main_input_name_gets_token_ids():
    """SAM 3's text tower declares ``pixel_values`` its main input but its forward takes ``input_ids``."""
    from transformers import Sam3LiteTextTextConfig, Sam3LiteTextTextModel

    cfg = Sam3LiteTextTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=2, projection_dim=16)
    inputs = _runs(Sam3LiteTextTextModel(cfg).eval())
    assert inputs["input_ids"].shape == (2, 8)


def test_trajectory_model_gets_states_actions_returns_and_timesteps():
    """Decision Transformer reads a trajectory: states and actions of the config's widths, per-step returns,
    timesteps inside its episode length."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    cfg = DecisionTransformerConfig(state_dim=5, act_dim=3, hidden_size=32, n_layer=1, n_head=2, max_ep_len=16)
    inputs = _runs(DecisionTransformerModel(cfg).eval())
    assert inputs["states"].shape == (2, 8, 5) and inputs["actions"].shape == (2, 8, 3)
    assert inputs["returns_to_go"].shape == (2, 8, 1) and int(inputs["timesteps"].max()) < 16


def test_forward_requiring_embeddings_gets_them_and_encoder_states_of_the_encoder_width():
    """BLIP-2's Q-Former requires ``query_embeds`` and cross-attends to ``encoder_hidden_states`` of its
    config's ``encoder_hidden_size``."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=48, encoder_hidden_size=24)
    inputs = _runs(Blip2QFormerModel(cfg).eval())
    assert inputs["query_embeds"].shape == (2, 8, 32)
    assert inputs["encoder_hidden_states"].shape[-1] == 24


def test_image_matcher_gets_a_pair_of_images_per_sample():
    """EfficientLoFTR matches two images: its forward refuses one image per sample and takes
    ``(batch, 2, C, H, W)``."""
    from transformers import EfficientLoFTRConfig, EfficientLoFTRModel

    cfg = EfficientLoFTRConfig(stage_num_blocks=[1, 1, 1, 1], num_attention_layers=1)
    inputs = _runs(EfficientLoFTRModel(cfg).eval())
    assert inputs["pixel_values"].shape == (2, 2, 3, 32, 32)


def test_images_larger_than_the_default_where_the_model_downsamples_past_it():
    """UVDoc's config gives no image size and its backbone leaves 32-pixel images 2 x 2 maps, which its
    reflect padding of 2 refuses: the first larger images it runs on, 64 pixels a side."""
    from transformers import UVDocConfig, UVDocModel

    cfg = UVDocConfig(backbone_config={"model_type": "uvdoc_backbone",
                                       "out_features": [f"stage{i}" for i in range(1, 7)]})
    inputs = _runs(UVDocModel(cfg).eval())
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)


def test_in_context_segmenter_gets_its_prompt_image_and_mask():
    """SegGPT requires a prompt image and its mask beside the image, each half the config's height (the
    forward stacks the two)."""
    from transformers import SegGptConfig, SegGptModel

    cfg = SegGptConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=48, image_size=[64, 32],
                       patch_size=16, decoder_hidden_size=16, intermediate_hidden_state_indices=[0, 1],
                       merge_index=0)
    inputs = _runs(SegGptModel(cfg).eval())
    assert inputs["pixel_values"].shape == inputs["prompt_masks"].shape == (2, 3, 32, 32)


def test_longformer_gets_a_global_token_and_its_global_attention_moves():
    """Longformer's global attention (its own query/key/value projections) runs only for tokens marked in
    ``global_attention_mask``: derived inputs mark each sample's first token, and the data-dependent
    gathering of the global tokens (``nonzero(as_tuple=True)``, ``x[mask]``) is traced by draft export
    through ``nonzero``. The global projections move with their heads (were fixed as unused)."""
    from transformers import LongformerConfig, LongformerForMaskedLM

    import permgraph as pg

    cfg = LongformerConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=48, attention_window=[4], max_position_embeddings=40,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, sep_token_id=2)
    torch.manual_seed(0)
    model = LongformerForMaskedLM(cfg).eval().double()
    marks = _runs(model)["global_attention_mask"]
    assert marks.shape == (2, 8) and marks[:, 0].eq(1).all() and int(marks.sum()) == 2
    spec = pg.compile(model)
    assert "draft" in spec.info
    glob = [p for p in spec.shapes if "_global.weight" in p]
    assert len(glob) == 3 and all(any(t.groups() for t in spec.axes_of(p)) for p in glob)
    for seed in (0, 1):
        assert pg.verify(model, spec, seed=seed, tolerance=1e-12).ok


def test_codebook_decoder_gets_a_row_of_decoder_ids_per_codebook():
    """MusicGen's decoder reads ``(batch x num_codebooks, length)`` audio codes, one row per codebook."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config
    from transformers import MusicgenForConditionalGeneration as Musicgen

    t5 = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=2)
    codec = EncodecConfig(hidden_size=32, num_filters=4, codebook_size=16, upsampling_ratios=[2, 2])
    dec = MusicgenDecoderConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                ffn_dim=48, num_codebooks=3, pad_token_id=16, bos_token_id=16)
    cfg = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=codec.to_dict(), decoder=dec.to_dict())
    inputs = _runs(Musicgen(cfg).eval())
    assert inputs["decoder_input_ids"].shape == (2 * 3, 4)


def test_code_channel_decoder_gets_a_code_per_channel_at_each_step():
    """Dia's decoder reads ``(batch, length, num_channels)`` audio codes of its decoder config's vocabulary
    (its 2-D path reshapes them into a transposed view its embedding cannot view)."""
    from transformers import DiaConfig, DiaForConditionalGeneration

    enc = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "head_dim": 16, "intermediate_size": 48}
    dec = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "head_dim": 16, "intermediate_size": 48, "cross_hidden_size": 32, "cross_num_attention_heads": 2,
           "cross_num_key_value_heads": 2, "cross_head_dim": 16, "num_channels": 3, "vocab_size": 40}
    cfg = DiaConfig(encoder_config=enc, decoder_config=dec, delay_pattern=[0, 1, 2])
    inputs = _runs(DiaForConditionalGeneration(cfg).eval())
    assert inputs["decoder_input_ids"].shape == (2, 4, 3)
    assert int(inputs["decoder_input_ids"].max()) < 40


def test_token_ids_inside_the_vocabulary_of_a_sub_config():
    """FastSpeech 2 Conformer with HiFi-GAN declares no vocabulary of its own: its phoneme ids lie below its
    model config's (78), not the 100 of a config with none."""
    from transformers import FastSpeech2ConformerHifiGanConfig as Vocoder
    from transformers import FastSpeech2ConformerWithHifiGan, FastSpeech2ConformerWithHifiGanConfig

    small = {"hidden_size": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_num_attention_heads": 2,
             "decoder_num_attention_heads": 2, "encoder_linear_units": 48, "decoder_linear_units": 48,
             "num_mel_bins": 16, "speech_decoder_postnet_units": 16, "speech_decoder_postnet_layers": 1}
    vocoder = Vocoder(model_in_dim=16, upsample_initial_channel=16, upsample_rates=[2], upsample_kernel_sizes=[4],
                      resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1]])
    cfg = FastSpeech2ConformerWithHifiGanConfig(model_config=small, vocoder_config=vocoder.to_dict())
    inputs = default_example_inputs(FastSpeech2ConformerWithHifiGan(cfg).eval())
    assert int(inputs["input_ids"].max()) < cfg.model_config.vocab_size == 78


def test_audio_cut_into_frames_gets_whole_frames():
    """Moonshine Streaming cuts raw audio into frames of ``frame_ms`` at ``sample_rate`` (80 samples here):
    16 whole frames, which 1024 samples are not."""
    from transformers import MoonshineStreamingConfig, MoonshineStreamingEncoderConfig
    from transformers import MoonshineStreamingForConditionalGeneration as Moonshine

    enc = MoonshineStreamingEncoderConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                          sliding_windows=[[16, 4], [16, 0]])
    cfg = MoonshineStreamingConfig(encoder_config=enc.to_dict(), vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    assert _runs(Moonshine(cfg).eval())["input_values"].shape == (2, 16 * 80)


def test_images_sized_by_the_vision_config_of_a_vision_language_encoder():
    """T5Gemma 2's encoder is a vision-language config: images of its ``vision_config``'s size (64 pixels,
    16 patches pooled to 4 image tokens)."""
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration

    text = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                  patch_size=16)
    cfg = T5Gemma2Config(encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                      boi_token_index=125, eoi_token_index=126, image_token_index=127),
                         decoder=text, image_token_index=127)
    inputs = _runs(T5Gemma2ForConditionalGeneration(cfg).eval())
    assert inputs["pixel_values"].shape == (2, 3, 64, 64) and int((inputs["input_ids"] == 127).sum()) == 2 * 4


def test_spectrogram_of_stacked_frames_gets_the_width_its_feature_projection_reads():
    """Wav2Vec2-BERT's feature projection reads two stacked frames of 80 mels (``feature_projection_input_dim``
    160): frames first, 160 wide."""
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    cfg = Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                             output_hidden_size=32, conv_depthwise_kernel_size=3, max_source_positions=32)
    assert _runs(Wav2Vec2BertModel(cfg).eval())["input_features"].shape == (2, 64, 160)


def test_entity_stream_puts_the_entity_aware_attention_in_the_forward():
    """LUKE reads ``entity_ids`` from ``entity_vocab_size`` beside the words, and its entity-aware attention
    has query projections used only with entities: derived inputs carry two entities per sample with
    mention spans, so those parameters move and the spec holds."""
    from transformers import LukeConfig, LukeForMaskedLM

    cfg = LukeConfig(vocab_size=100, entity_vocab_size=50, entity_emb_size=16, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LukeForMaskedLM(cfg).double().eval()
    inputs = default_example_inputs(model)
    assert inputs["entity_ids"].shape == (2, 2) and int(inputs["entity_ids"].max()) < 50
    assert inputs["entity_position_ids"][0].tolist() == [[1, -1], [2, -1]]
    spec = pg.compile(model)
    for p in ("luke.entity_embeddings.entity_embeddings.weight", "luke.encoder.layer.0.attention.self.w2e_query.weight",
              "luke.encoder.layer.0.attention.self.e2e_query.weight"):
        assert any(t.groups() for t in spec.axes_of(p)), p
    assert pg.verify(model, spec, promote_float32=True).ok


def test_spectrogram_whose_input_layer_reads_stacked_mels_gets_that_width():
    """Granite Speech 5's encoder reads delta-expanded mels stacked in pairs, 4 x ``num_mel_bins`` wide, which no
    config key says: frames first, as wide as its first linear layer reads."""
    from transformers import GraniteSpeech5Encoder, GraniteSpeech5EncoderConfig

    cfg = GraniteSpeech5EncoderConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, num_mel_bins=24, vocab_size=32,
                                      context_size=32, max_position_embeddings=32)
    assert _runs(GraniteSpeech5Encoder(cfg).eval())["input_features"].shape == (2, 64, 96)
