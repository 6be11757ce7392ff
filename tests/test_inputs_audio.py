"""Derived inputs of audio-language models: the audio tower is in the traced forward and moves."""
from __future__ import annotations

import inspect

import torch

import permgraph as pg
from permgraph.inputs import default_example_inputs
from permgraph.testing.zoo import TINY_TEXT, tiny_audio_lm


def _moves(spec: pg.PermSpec, param: str) -> bool:
    return any(t.groups() for t in spec.axes_of(param))


def test_qwen2_audio_without_get_audio_features_counts_tokens_with_the_towers_own_lengths():
    """Qwen2-Audio has no ``get_audio_features``: the audio token count comes from the tower's
    ``_get_feat_extract_output_lengths`` on the frame mask, and the forward accepts the result."""
    model = tiny_audio_lm("qwen2_audio")
    inputs = default_example_inputs(model)
    assert inputs["input_features"].shape == (2, 16, 40)  # Whisper-style: 2 x max_source_positions frames
    assert inputs["feature_attention_mask"].shape == (2, 40)
    assert (inputs["input_ids"] == 100).sum() == 2 * 10  # (40 - 1) // 2 + 1 = 20 frames, pooled to 10
    spec = pg.compile(model)
    tower = [p for p in spec.shapes if ".audio_tower.layers." in p and p.endswith(("fc1.weight", "fc2.weight"))]
    assert tower and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_granite_speech_gets_frames_first_features_without_the_projected_feature_mask():
    """Granite Speech's conformer reads ``(batch, frames, input_dim)``, and its
    ``input_features_mask`` masks projected features, not frames: the candidate with an all-ones
    frame mask fails the forward and the one without it is kept."""
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    cfg = GraniteSpeechConfig(
        audio_token_index=100, window_size=4, downsample_rate=2,
        text_config={**TINY_TEXT, "model_type": "granite"},
        encoder_config={"input_dim": 20, "num_layers": 1, "hidden_dim": 32, "num_heads": 4, "dim_head": 8,
                        "output_dim": 12, "context_size": 16, "max_pos_emb": 32, "feedforward_mult": 2,
                        "conv_kernel_size": 3},
        projector_config={"model_type": "blip_2_qformer", "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 4, "intermediate_size": 48, "encoder_hidden_size": 32})
    torch.manual_seed(0)
    model = GraniteSpeechForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["input_features"].shape == (2, 64, 20) and "input_features_mask" not in inputs
    assert (inputs["input_ids"] == 100).sum() > 0
    spec = pg.compile(model)
    ff = [p for p in spec.shapes if ".encoder.layers." in p and p.endswith(("up_proj.weight", "down_proj.weight"))]
    assert ff and all(_moves(spec, p) for p in ff)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_audio_inputs_that_no_forward_accepts_leave_text_only_inputs():
    """A model whose audio tower rejects every candidate layout keeps the text-only inputs."""
    model = tiny_audio_lm("qwen2_audio")
    model.config.audio_config.num_mel_bins = 7  # the tower's conv still wants 16 channels: no candidate fits
    inputs = default_example_inputs(model)
    assert set(inputs) == {"input_ids", "use_cache"} and inputs["input_ids"].shape == (2, 8)


def test_kosmos_2_5_gets_flattened_patches_and_the_image_position_mask():
    """Kosmos-2.5 reads Pix2Struct-layout ``flattened_patches`` (row and column indices, then pixels)
    and marks its ``latent_query_num`` image embeddings with ``image_embeds_position_mask``, not a
    token id, and has no ``get_image_features``: the derived inputs put the vision tower in the
    traced forward."""
    from transformers import Kosmos2_5Config, Kosmos2_5ForConditionalGeneration

    cfg = Kosmos2_5Config(
        latent_query_num=4,
        text_config={"vocab_size": 128, "embed_dim": 32, "layers": 1, "attention_heads": 4, "ffn_dim": 48},
        vision_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "head_dim": 8, "patch_embed_hidden_size": 12, "max_num_patches": 16})
    torch.manual_seed(0)
    model = Kosmos2_5ForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["flattened_patches"].shape == (2, 16, 2 + 12)
    assert inputs["image_embeds_position_mask"].sum() == 2 * 4 and inputs["input_ids"].shape == (2, 8 + 4)
    spec = pg.compile(model)
    tower = [p for p in spec.shapes if p.startswith("vision_model.") and p.endswith(".weight")]
    assert tower and all(_moves(spec, p) for p in tower if "layers." in p)
    assert pg.verify(model, spec, promote_float32=True).ok


def _tiny_qwen3_asr() -> torch.nn.Module:
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    cfg = Qwen3ASRConfig(
        audio_token_id=100, text_config={**TINY_TEXT, "model_type": "qwen3", "head_dim": 8},
        audio_config={"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 4, "encoder_ffn_dim": 48,
                      "num_mel_bins": 16, "downsample_hidden_size": 8, "output_dim": 32})
    torch.manual_seed(0)
    return Qwen3ASRForConditionalGeneration(cfg).eval()


def test_qwen3_asr_audio_tower_traced_with_its_recorded_attention_windows():
    """Qwen3-ASR's tower computes its attention windows (``cu_seqlens``) from the frame mask's values
    with a Python loop, in ``get_audio_cu_seqlens``, which takes them precomputed only from keyword
    arguments that the forward never hands to ``get_audio_features``. The helper's result recorded in
    one eager forward stands in for it while exporting (with eager attention): the tower is traced
    (was: text-only inputs), the spec says what it is specialised to, and it is exact."""
    model = _tiny_qwen3_asr()
    inputs = default_example_inputs(model)
    assert inputs["input_features"].shape == (2, 16, 400) and (inputs["input_ids"] == 100).any()
    assert not [k for k in inputs if k.startswith("audio_")]  # precomputed that no helper would read: left out
    spec = pg.compile(model)
    assert "text_only_inputs" not in spec.info and "dropped_inputs" not in spec.info
    assert "get_audio_cu_seqlens (1 call)" in spec.info["specialised"]
    tower = [p for p in spec.shapes if ".audio_tower.layers." in p and p.endswith(("fc1.weight", "fc2.weight"))]
    assert tower and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_chunked_audio_encoder_gets_whole_windows_of_frames_with_its_mask():
    """Qwen3-ASR's encoder attends within windows of ``2 * n_window`` frames and requires its frame mask:
    the derived spectrogram's length is a multiple of the window, with an all-ones ``input_features_mask``."""
    import torch
    from transformers.models.qwen3_asr.configuration_qwen3_asr import Qwen3ASREncoderConfig
    from transformers.models.qwen3_asr.modeling_qwen3_asr import Qwen3ASREncoder

    from permgraph.inputs import default_example_inputs

    cfg = Qwen3ASREncoderConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=48,
                                num_mel_bins=16, output_dim=24, downsample_hidden_size=16, n_window=50)
    model = Qwen3ASREncoder(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["input_features"].shape[:2] == (2, 16) and inputs["input_features"].shape[2] % 100 == 0
    assert bool(inputs["input_features_mask"].all())
    with torch.no_grad():
        model(**inputs)


def test_spectrogram_without_a_mel_count_in_the_config_tries_128_bins():
    """Gemma 4's audio tower sizes its projection for 128 mel bins (its subsampling's first width), which
    its config does not name: after 80 bins in both layouts, 128 bins are tried, and the tower traces."""
    from transformers import Gemma4AudioConfig, Gemma4AudioModel

    torch.manual_seed(0)
    model = Gemma4AudioModel(Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)).eval()
    inputs = default_example_inputs(model)
    assert inputs["input_features"].shape == (2, 64, 128)  # (batch, frames, mels)
    spec = pg.compile(model)
    assert _moves(spec, "subsample_conv_projection.input_proj_linear.weight")
    assert _moves(spec, "layers.0.feed_forward1.ffw_layer_1.linear.weight")
    assert pg.verify(model, spec, dtype=torch.float32).ok


def _tiny_qwen3_omni_thinker() -> torch.nn.Module:
    import transformers

    cfg = transformers.Qwen3OmniMoeThinkerConfig(
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                          output_dim=32, downsample_hidden_size=4, max_source_positions=100, n_window=50,
                          n_window_infer=200),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32,
                           deepstack_visual_indexes=[0]),
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=16,
                         num_experts=2, num_experts_per_tok=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]}),
        audio_token_id=100, image_token_id=101, video_token_id=102, audio_start_token_id=103, vision_start_token_id=104)
    torch.manual_seed(0)
    model = transformers.Qwen3OmniMoeThinkerForConditionalGeneration(cfg).double().eval()
    model.set_experts_implementation("batched_mm")  # grouped_mm takes no float64 on CPU
    return model


def test_qwen3_omni_audio_tower_gets_its_chunked_frames_precomputed():
    """Qwen3-Omni's audio tower chunks the frames and packs the chunks with helpers that compute sizes
    from the frame counts' values (``chunk_and_pad_features``: ``split(lengths.tolist())``), which take
    their results precomputed from ``audio_``-prefixed keyword arguments. Derived inputs pass them,
    computed by the model's own calls in one eager forward: the tower is traced without draft export
    or replayed constants, and it moves (was: dropped, the audio tower fixed as unused)."""
    model = _tiny_qwen3_omni_thinker()
    inputs = default_example_inputs(model, modalities=("audio",))
    assert inputs["input_features"].shape == (2, 16, 200) and (inputs["input_ids"] == 100).any()
    assert {"audio_padded_feature", "audio_chunk_lengths", "audio_valid_indices", "audio_cu_seqlens"} <= set(inputs)
    assert inputs["audio_padded_feature"].shape == (4, 16, 100)  # 2 samples x 2 chunks of 2 * n_window frames
    spec = pg.compile(model, inputs)
    assert "draft" not in spec.info and "specialised" not in spec.info
    tower = [p for p in spec.shapes if ".audio_tower." in p and p.endswith(("fc1.weight", "fc2.weight", "proj1.weight",
                                                                             "conv2d2.weight"))]
    assert len(tower) == 4 and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, inputs, promote_float32=True).ok


def _pe_audio_config(ratios: list[int]) -> dict:
    return dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16,
                dac_config={"encoder_hidden_size": 8, "downsampling_ratios": ratios, "hidden_size": 32,
                            "decoder_hidden_size": 16, "codebook_dim": 8, "n_codebooks": 2})


def test_raw_audio_encoder_gets_whole_hops_of_its_codec():
    """PE Audio's encoder reads raw audio through a DAC codec that downsamples by 2048: 1024 samples are too
    few for its kernels, four hops run."""
    from transformers import PeAudioEncoder, PeAudioEncoderConfig

    model = PeAudioEncoder(PeAudioEncoderConfig(**_pe_audio_config([4, 8, 8, 8]))).eval()
    inputs = default_example_inputs(model)
    with torch.no_grad():
        model(**inputs)
    assert inputs["input_values"].shape == (2, 1, 4 * 2048)


def test_text_model_that_requires_raw_audio_beside_text_gets_both():
    """PE Audio's contrastive model requires ``input_values`` beside its text's ``input_ids``."""
    from transformers import PeAudioConfig, PeAudioModel

    text = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "pad_token_id": 0}
    model = PeAudioModel(PeAudioConfig(text_config=text, audio_config=_pe_audio_config([2, 4, 8]))).eval()
    inputs = default_example_inputs(model)
    with torch.no_grad():
        model(**inputs)
    assert set(inputs) >= {"input_ids", "input_values"}


def test_latent_decoder_gets_channels_first_latents_of_its_width():
    """Mimi's decoder reads continuous latents ``(batch, hidden_size, frames)``."""
    from transformers import MimiDecoderConfig, MimiDecoderModel

    cfg = MimiDecoderConfig(hidden_size=32, num_filters=8, upsampling_ratios=[2, 2], upsample_groups=32,
                            num_hidden_layers=1, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
                            head_dim=16, codebook_dim=16, vector_quantization_hidden_dimension=16)
    model = MimiDecoderModel(cfg).eval()
    inputs = default_example_inputs(model)
    with torch.no_grad():
        model(**inputs)
    assert inputs["latents"].shape == (2, 32, 8)


def test_contrastive_audio_text_model_gets_spectrogram_frames_for_its_audio_tower():
    """CLAP reads spectrograms next to the text without audio placeholders: ``(batch, 1, frames, mels)`` frames
    (its HTSAT's layout, after the Whisper one fails), and its audio tower moves."""
    from transformers import ClapConfig, ClapModel

    text = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 2, "projection_dim": 16}
    audio = {"hidden_size": 32, "patch_embeds_hidden_size": 4, "depths": [1, 1, 1, 1], "num_attention_heads": [2] * 4,
             "projection_dim": 16}  # 64 mel bins, images of 256 x 256 (the default spec_size)
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).eval()
    inputs = default_example_inputs(model)
    assert inputs["input_features"].shape == (2, 1, 64, 64)
    spec = pg.compile(model)
    assert _moves(spec, "audio_model.audio_encoder.layers.0.blocks.0.intermediate.dense.weight")
    assert pg.verify(model, spec, promote_float32=True).ok


def test_waveform_lengths_beside_features_are_whole_hops_of_the_frames():
    """A forward that takes waveform lengths (Dots3-Note's ``chunk_sample_lengths``: its conv stem masks
    frames past ``lengths // hop_length``) gets, with every candidate layout, ``frames * hop_length``
    samples per clip, so no frame is masked and the token count follows the frames."""
    from types import SimpleNamespace

    import torch.nn as nn

    from permgraph.inputs.audio import _audio_inputs

    class Tower(nn.Module):
        config = SimpleNamespace(audio_config=SimpleNamespace(num_mel_bins=16, hop_length=160, input_dim=20))

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 4)

        def forward(self, input_ids=None, input_features=None, chunk_sample_lengths=None):
            return self.proj(input_features)

    cands = list(_audio_inputs(Tower(), 2, torch.Generator().manual_seed(0)))
    assert cands and all(set(c) == {"input_features", "chunk_sample_lengths"} for c in cands)
    for c in cands:
        feats, lengths = c["input_features"], c["chunk_sample_lengths"]
        frames = feats.shape[-1] if feats.shape[1] == 16 else feats.shape[1]
        assert lengths.dtype == torch.long and lengths.tolist() == [frames * 160] * 2
    Tower.config = SimpleNamespace(audio_config=SimpleNamespace(num_mel_bins=16))  # no hop: no lengths
    assert all("chunk_sample_lengths" not in c for c in _audio_inputs(Tower(), 2, torch.Generator()))


def test_codec_halves_whose_forward_renames_the_main_input_get_audio_and_latents():
    """VibeVoice's acoustic encoder and decoder declare ``input_values`` but take ``hidden_states``: the encoder
    gets raw audio under that name (four hops of its downsampling), the decoder the latents of its width."""
    from transformers import CONFIG_MAPPING, AutoModel

    for kind, shape in (("encoder", (2, 1, 4 * 3200)), ("decoder", (2, 16, 8))):
        cfg = CONFIG_MAPPING[f"vibevoice_acoustic_tokenizer_{kind}"](num_filters=4, depths=[1] * 7, hidden_size=16)
        torch.manual_seed(0)
        model = AutoModel.from_config(cfg).double().eval()
        params = inspect.signature(model.forward).parameters
        assert model.main_input_name == "input_values" and "input_values" not in params
        with torch.no_grad():  # layer scales of 1e-6 would hide the blocks' outputs
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        inputs = default_example_inputs(model)
        assert set(inputs) - {"use_cache"} == {"hidden_states"} and inputs["hidden_states"].shape == shape
        spec = pg.compile(model)
        assert _moves(spec, "stem.stage.0.ffn.linear1.weight")
        assert pg.verify(model, spec, promote_float32=True).ok


def _tiny_omniasr() -> torch.nn.Module:
    from transformers import OmniASRConfig, OmniASRForConditionalGeneration

    audio = {"hidden_size": 32, "conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2],
             "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 48,
             "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}
    cfg = OmniASRConfig(audio_config=audio, text_config={**TINY_TEXT, "model_type": "llama"}, audio_token_id=100)
    torch.manual_seed(0)
    return OmniASRForConditionalGeneration(cfg).eval()


def test_raw_audio_beside_text_gets_its_placeholders_and_the_tower_moves():
    """OmniASR reads raw audio (``input_values``) beside the text and splices the tower's frames into the
    audio placeholders: the derived inputs hold as many placeholders as frames, and the tower moves."""
    model = _tiny_omniasr()
    inputs = default_example_inputs(model)
    assert inputs["input_values"].shape[-1] == 1024 and inputs["padding_mask"].shape == (2, 1024)
    with torch.no_grad():
        frames = model.get_audio_features(inputs["input_values"], inputs["padding_mask"]).pooler_output
    assert (inputs["input_ids"] == 100).sum() == frames.shape[0] > 0
    spec = pg.compile(model)
    tower = [p for p in spec.shapes if ".audio_tower." in p and p.endswith("feed_forward.output_dense.weight")]
    assert tower and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_noise_drawing_sample_flag_is_off_while_tracing():
    """VibeVoice-ASR draws noise into its audio latents unless ``sample=False`` (two forwards differ): derived
    inputs trace with it off, and the spec is checked; a forward's ``sample`` that is not a flag is left."""
    from transformers import VibeVoiceAsrConfig, VibeVoiceAsrForConditionalGeneration

    from permgraph.inputs.model import tracing_flags
    from permgraph.inputs.resolve import resolve_inputs

    enc = {"hidden_size": 16, "num_filters": 4, "downsampling_ratios": [2, 4], "depths": [1, 1, 1], "kernel_size": 3}
    cfg = VibeVoiceAsrConfig(acoustic_tokenizer_encoder_config=enc, semantic_tokenizer_encoder_config=enc,
                             text_config={**TINY_TEXT, "model_type": "qwen2"}, audio_token_id=100)
    torch.manual_seed(0)
    model = VibeVoiceAsrForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["sample"] is False and (inputs["input_ids"] == 100).any()
    with torch.no_grad():
        noisy = [model(**{**inputs, "sample": True}).logits for _ in range(2)]
    assert not torch.equal(*noisy)
    spec = pg.compile(model)
    assert any(_moves(spec, p) for p in spec.shapes if "tokenizer_encoder" in p)
    assert pg.verify(model, spec, promote_float32=True).ok
    assert "sample" not in tracing_flags(inspect.signature(lambda sample=None: None).parameters)
    _, given = resolve_inputs(model, {"input_ids": inputs["input_ids"]})  # the user's inputs: off too
    assert given["sample"] is False
