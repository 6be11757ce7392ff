"""Derived inputs of vision-language models with more than one modality: every tower is in the traced
forward and moves."""
from __future__ import annotations

import torch

import permgraph as pg
from permgraph.inputs import default_example_inputs
from permgraph.testing.zoo import TINY_TEXT

TINY_CLIP_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 16, "patch_size": 8}


def _moves(spec: pg.PermSpec, param: str) -> bool:
    return any(t.groups() for t in spec.axes_of(param))


def _tiny_video_llava():
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    cfg = VideoLlavaConfig(image_token_index=100, video_token_index=101, vision_feature_layer=-1,
                           text_config={**TINY_TEXT, "model_type": "llama"}, vision_config=dict(TINY_CLIP_VISION))
    torch.manual_seed(0)
    return VideoLlavaForConditionalGeneration(cfg).eval()


def test_video_llava_gets_videos_for_its_video_tower_and_keeps_the_image_tokens():
    """Video-LLaVA reads videos with a tower of its own: derived inputs add ``pixel_values_videos``
    with one video token per frame feature, after the images, whose tokens stay in ``input_ids``."""
    model = _tiny_video_llava()
    inputs = default_example_inputs(model)
    assert inputs["pixel_values_videos"].shape == (2, 2, 3, 16, 16)
    ids = inputs["input_ids"]
    assert (ids == 100).sum() == 2 * 4  # (16 / 8)^2 patches per image, the class token cropped
    assert (ids == 101).sum() == 2 * 2 * 5  # 2 frames of 4 patches and the class token
    spec = pg.compile(model)
    towers = [p for p in spec.shapes if (".video_tower." in p or ".image_tower." in p) and "layers." in p
              and p.endswith(("fc1.weight", "fc2.weight"))]
    assert any(".video_tower." in p for p in towers) and all(_moves(spec, p) for p in towers)
    assert spec.info.get("text_only_inputs") is None
    assert pg.verify(model, spec, promote_float32=True).ok


def test_videos_read_by_the_image_tower_are_left_out():
    """LLaVA-NeXT-Video reads videos with its image tower: videos would add no parameter to the
    forward, so the derived inputs stay images and text."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    cfg = LlavaNextVideoConfig(image_token_index=100, video_token_index=101, vision_feature_layer=-1,
                               image_grid_pinpoints=[[16, 16]],
                               text_config={**TINY_TEXT, "model_type": "llama"}, vision_config=dict(TINY_CLIP_VISION))
    torch.manual_seed(0)
    model = LlavaNextVideoForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    assert "pixel_values" in inputs and "pixel_values_videos" not in inputs
    assert (inputs["input_ids"] == 100).sum() > 0


def test_a_modality_that_cannot_be_traced_is_dropped_before_the_others():
    """When the derived inputs with videos cannot be traced, ``compile`` drops the videos (the last
    modality added) and keeps the images, not the text alone; ``verify`` uses the same inputs."""
    model = _tiny_video_llava()
    tower = model.model.video_tower
    plain = tower.forward

    def untraceable(*args, **kwargs):
        if torch.compiler.is_exporting():
            raise RuntimeError("a video tower export cannot trace")
        return plain(*args, **kwargs)

    tower.forward = untraceable
    spec = pg.compile(model)
    assert spec.info["modalities"] == ["image"]
    assert "video" in spec.info["dropped_inputs"] and "text_only_inputs" not in spec.info
    assert all(_moves(spec, p) for p in spec.shapes if ".image_tower." in p and p.endswith("fc1.weight"))
    assert not any(_moves(spec, p) for p in spec.shapes if ".video_tower." in p)
    assert "video" in pg.explain(spec)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_vlm_whose_forward_requires_image_sizes_gets_them_as_a_list():
    """Mistral 3's patch merger reads each image's size in pixels (``image_sizes``, required with images): the
    derived inputs pass them as a list (read in Python), with one image token per merged patch, and its
    Pixtral tower moves."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    cfg = Mistral3Config(image_token_index=100, spatial_merge_size=2, vision_feature_layer=-1,
                         text_config={**TINY_TEXT, "model_type": "mistral"},
                         vision_config={"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 48,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
                                        "patch_size": 8, "head_dim": 16})
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["image_sizes"] == [[32, 32], [32, 32]]
    assert (inputs["input_ids"] == 100).sum() == 2 * (32 // 8 // 2) ** 2
    spec = pg.compile(model)
    tower = [p for p in spec.shapes if ".vision_tower." in p and p.endswith("feed_forward.up_proj.weight")]
    assert tower and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_navit_packed_images_with_their_grid_trace_the_whole_tower():
    """MiniCPM-V packs images' patches side by side in one row and reads each image's grid from
    ``target_sizes``: one image ``(1, C, P, s^2 * P)`` with its placeholders in the first sample's text;
    the tower's window merger computes its windows from the grid's values, replayed as recorded, and
    the spec holds (float64, float32 casts promoted)."""
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 4, "insert_layer_id": 0}
    cfg = MiniCPMV4_6Config(image_token_id=100, insert_layer_id=0, text_config=dict(TINY_TEXT),
                            vision_config=vision)
    torch.manual_seed(0)
    model = MiniCPMV4_6ForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    pv, sizes, ids = inputs["pixel_values"], inputs["target_sizes"], inputs["input_ids"]
    side = int(sizes[0, 0])
    assert sizes.tolist() == [[side, side]] and pv.shape == (1, 3, 4, side * side * 4)
    assert (ids[0] == 100).sum() > 0 and (ids[1] == 100).sum() == 0
    spec = pg.compile(model)
    assert spec.info.get("text_only_inputs") is None and "get_vision_window_index" in spec.info["specialised"]
    tower = [p for p in spec.shapes if ".vision_tower." in p and p.endswith(("fc1.weight", "linear_1.weight"))]
    assert any(".vit_merger." in p for p in tower) and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_navit_vision_tower_alone_gets_packed_images_with_their_grid():
    """MiniCPM-V's vision tower on its own (no text): the same packed images and ``target_sizes``."""
    from transformers.models.minicpmv4_6.modeling_minicpmv4_6 import MiniCPMV4_6VisionConfig, MiniCPMV4_6VisionModel

    cfg = MiniCPMV4_6VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=4, insert_layer_id=0)
    torch.manual_seed(0)
    model = MiniCPMV4_6VisionModel(cfg).eval()
    inputs = default_example_inputs(model)
    side = int(inputs["target_sizes"][0, 0])
    assert inputs["pixel_values"].shape == (1, 3, 4, side * side * 4)
    spec = pg.compile(model)
    assert _moves(spec, "encoder.layers.0.mlp.fc1.weight") and _moves(spec, "vit_merger.linear_1.weight")
    assert pg.verify(model, spec, promote_float32=True).ok


def test_grid_patches_with_the_vlms_image_merge_sizes():
    """VideoLLaMA 3's VLM takes each image's merge size as ``image_merge_sizes`` (its tower: ``merge_sizes``)."""
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
              "patch_size": 4}
    cfg = VideoLlama3Config(image_token_id=100, video_token_id=101, text_config=dict(TINY_TEXT),
                            vision_config=vision)
    torch.manual_seed(0)
    model = VideoLlama3ForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["image_merge_sizes"].tolist() == [1, 1] and (inputs["input_ids"] == 100).sum() > 0
    spec = pg.compile(model)
    tower = [p for p in spec.shapes if ".vision_model." in p and p.endswith("fc1.weight")]
    assert tower and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_task_head_without_get_image_features_counts_image_tokens_with_its_base_models():
    """ModernVBERT's masked LM has no ``get_image_features`` of its own: the image tokens are counted with
    its base model's, so the vision tower is in the traced forward and moves."""
    from transformers import ModernVBertConfig, ModernVBertForMaskedLM

    text = {"model_type": "modernbert", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4, "pad_token_id": 0, "bos_token_id": 1,
            "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2}
    cfg = ModernVBertConfig(image_token_id=100, pixel_shuffle_factor=2, text_config=text,
                            vision_config={**TINY_CLIP_VISION, "model_type": "siglip_vision_model", "patch_size": 4})
    torch.manual_seed(0)
    model = ModernVBertForMaskedLM(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["pixel_values"].shape == (2, 1, 3, 16, 16) and (inputs["input_ids"] == 100).sum() == 2 * 4
    spec = pg.compile(model)
    tower = [p for p in spec.shapes if ".vision_model.encoder." in p and p.endswith("fc1.weight")]
    assert tower and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_image_tiles_with_the_mask_of_real_tiles_the_model_requires():
    """Granite Docling's ``get_image_features`` requires ``pixel_attention_mask`` marking real tiles
    ``(batch, tiles)``: after the tiles alone fail, they come with an all-true mask, and the tower moves."""
    from transformers import GraniteDoclingConfig, GraniteDoclingForConditionalGeneration

    text = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "eos_token_id": 2}
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 4, "out_hidden_size": 32, "scale_factor": 2}
    cfg = GraniteDoclingConfig(image_token_id=100, pad_token_id=0, text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = GraniteDoclingForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["pixel_values"].shape == (2, 1, 3, 32, 32) and inputs["pixel_attention_mask"].all()
    assert (inputs["input_ids"] == 100).sum() > 0
    spec = pg.compile(model)
    assert spec.info.get("text_only_inputs") is None
    assert _moves(spec, "model.vision_model.encoder.layers.0.mlp.fc1.weight")
    assert pg.verify(model, spec, promote_float32=True).ok


def test_vlm_with_a_high_resolution_tower_gets_images_at_both_resolutions():
    """DeepSeek-VL hybrid reads ``high_res_pixel_values`` with a second tower sized by its
    ``high_res_vision_config``; the forward refuses images without them."""
    from transformers import DeepseekVLHybridConfig, DeepseekVLHybridForConditionalGeneration

    cfg = DeepseekVLHybridConfig(
        text_config={**TINY_TEXT, "model_type": "llama"}, image_token_id=63,
        vision_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        high_res_vision_config={"hidden_size": 32, "output_channels": 16, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "image_size": 256, "patch_size": 16, "window_size": 4,
                                "global_attn_indexes": [0], "mlp_dim": 48})
    torch.manual_seed(0)
    model = DeepseekVLHybridForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    with torch.no_grad():
        model(**inputs)
    assert inputs["high_res_pixel_values"].shape == (2, 3, 256, 256) and (inputs["input_ids"] == 63).any()


def test_cross_modality_encoder_gets_region_features_of_the_configs_widths():
    """LXMERT requires ``visual_feats`` and ``visual_pos`` beside the text, of its config's ``visual_feat_dim``
    and ``visual_pos_dim``."""
    from transformers import LxmertConfig, LxmertModel

    cfg = LxmertConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=48, l_layers=1,
                       x_layers=1, r_layers=1, visual_feat_dim=24, visual_pos_dim=4)
    inputs = default_example_inputs(LxmertModel(cfg).eval())
    assert inputs["visual_feats"].shape == (2, 4, 24) and inputs["visual_pos"].shape == (2, 4, 4)


def test_images_attended_by_the_text_through_gated_cross_attention():
    """Idefics reads images per sample ``(batch, images, C, H, W)`` through gated cross-attention, with
    ``image_attention_mask`` ``(batch, text, images)``: after the plain images fail, one image per sample that
    every token attends to; the vision tower moves."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    vision = {"embed_dim": 32, "image_size": 32, "patch_size": 8, "intermediate_size": 48, "num_hidden_layers": 1,
              "num_attention_heads": 2}
    cfg = IdeficsConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, vision_config=vision)
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["pixel_values"].shape == (2, 1, 3, 32, 32) and inputs["image_attention_mask"].shape == (2, 8, 1)
    spec = pg.compile(model)
    assert _moves(spec, "model.vision_model.encoder.layers.0.mlp.fc1.weight")
    assert pg.verify(model, spec, promote_float32=True).ok


def test_vlm_without_a_vision_tower_gets_patchified_images():
    """Fuyu embeds image patches with one linear layer (no vision config): ``(batch, 16, C * P * P)`` patches,
    16 image tokens per sample; the patch embedding moves."""
    from transformers import FuyuConfig, FuyuForCausalLM

    text = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    cfg = FuyuConfig(text_config=text, image_size=32, patch_size=8, image_token_id=100, pad_token_id=0)
    torch.manual_seed(0)
    model = FuyuForCausalLM(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["pixel_values"].shape == (2, 16, 3 * 8 * 8) and int((inputs["input_ids"] == 100).sum()) == 32
    spec = pg.compile(model)
    assert _moves(spec, "model.vision_embed_tokens.weight")
    assert pg.verify(model, spec, promote_float32=True).ok


def test_naflex_tower_behind_placeholders_gets_patchified_images_with_their_grid():
    """LFM2-VL's SigLIP 2 tower has no image size: patchified images on its ``num_patches`` grid with
    ``spatial_shapes`` and ``pixel_attention_mask``, and as many placeholders as the pixel-unshuffled features."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    text = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "layer_types": ["conv", "full_attention"]}
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_patches": 16, "patch_size": 4}
    cfg = Lfm2VlConfig(text_config=text, vision_config=vision, image_token_id=100, projector_hidden_size=32)
    inputs = default_example_inputs(Lfm2VlForConditionalGeneration(cfg).eval())
    assert inputs["pixel_values"].shape == (2, 16, 3 * 4 * 4) and inputs["spatial_shapes"].tolist() == [[4, 4]] * 2
    assert int((inputs["input_ids"] == 100).sum()) == 2 * 4  # 4 x 4 patches, unshuffled by 2


def test_vq_image_tokenizer_gets_images_of_32_pixels_and_their_code_placeholders():
    """Chameleon turns images into VQ codes and has no image size in its config: 32-pixel images, as many
    ``<image>`` placeholders as codes (a 2 x 2 grid: the VQ downsamples by 16)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    codes = {"IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z": 90 + i for i in range(16)}
    vq = {"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8, "base_channels": 32,
          "channel_multiplier": [1, 1, 1, 1, 1]}
    cfg = ChameleonConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, vq_config=vq,
                          vocabulary_map={"<image>": 120, **codes})
    inputs = default_example_inputs(ChameleonForConditionalGeneration(cfg).eval())
    assert inputs["pixel_values"].shape == (2, 3, 32, 32) and int((inputs["input_ids"] == 120).sum()) == 2 * 4


def test_vlm_with_a_height_width_image_grid_gets_packed_patches_and_the_grid():
    """Nemotron-H Omni reads packed patches with each image's ``image_grid_hw`` (height, width; no temporal
    column) and merges 2 x 2 patches by its pixel shuffle (``downsample_ratio`` 0.5): ``(batch * 16,
    C * P * P)`` patches on 4 x 4 grids, a placeholder per merged token, the RADIO tower in the spec."""
    from transformers import CONFIG_MAPPING, NemotronH_Omni_Reasoning_V3

    vision = {"model_type": "radio", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
              "patch_size": 4, "image_size": 16, "max_img_size": 64, "num_cls_tokens": 1, "num_registers": 0,
              "video_temporal_patch_size": 2}
    text = {"model_type": "nemotron_h", "vocab_size": 128, "hidden_size": 32, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48,
            "layers_block_type": ["full_attention", "mlp"], "max_position_embeddings": 64}
    cfg = CONFIG_MAPPING["nemotron_h_omni"](vision_config=vision, text_config=text, audio_config=None,
                                            downsample_ratio=0.5, projector_hidden_size=32, vision_hidden_size=32,
                                            image_token_id=100, video_token_id=101)
    torch.manual_seed(0)
    model = NemotronH_Omni_Reasoning_V3(cfg).eval()
    inputs = default_example_inputs(model, modalities=("image",))
    assert inputs["image_grid_hw"].tolist() == [[4, 4]] * 2 and inputs["pixel_values"].shape == (32, 3 * 4 * 4)
    assert int((inputs["input_ids"] == 100).sum()) == 2 * 4
    spec = pg.compile(model, inputs)
    tower = [p for p in spec.shapes if p.startswith("vision_model.encoder.") and p.endswith("proj.weight")]
    assert tower and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_vlm_without_an_image_size_gets_images_of_32_pixels():
    """Florence-2's DaViT tower has no ``image_size`` in its config: 32-pixel images (as plain images get),
    with a placeholder per feature, the tower's stages in the spec."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    vision = {"embed_dim": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
              "num_groups": [1, 2, 4, 8], "projection_dim": 32, "window_size": 4}
    text = {"model_type": "bart", "vocab_size": 128, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
            "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 48,
            "decoder_ffn_dim": 48, "max_position_embeddings": 64}
    cfg = Florence2Config(vision_config=vision, text_config=text, image_token_id=100)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["pixel_values"].shape == (2, 3, 32, 32) and bool((inputs["input_ids"] == 100).any())
    spec = pg.compile(model, inputs)
    tower = [p for p in spec.shapes if ".vision_tower." in p and p.endswith("fc1.weight")]
    assert tower and all(_moves(spec, p) for p in tower)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_model_with_several_main_inputs_gets_each_task_prompt_ids_too():
    """OneFormer's ``main_input_name`` is a list (images, then the task prompt): no crash, images and
    ``task_inputs`` token ids ``(batch, task_seq_len)`` that its task MLP reads."""
    from transformers import OneFormerConfig, OneFormerModel

    cfg = OneFormerConfig(task_seq_len=8, text_encoder_context_length=8, text_encoder_vocab_size=64)
    model = OneFormerModel(cfg).eval()
    assert isinstance(model.main_input_name, list)
    inputs = default_example_inputs(model)
    assert inputs["task_inputs"].shape == (2, 8) and inputs["task_inputs"].dtype == torch.long
    assert inputs["pixel_values"].shape[:2] == (2, 3)
    with torch.no_grad():
        model(**inputs)


def _tiny_phi4_multimodal():
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 28, "crop_size": 28, "patch_size": 7, "image_token_id": 100}
    audio = {"hidden_size": 32, "intermediate_size": 48, "num_blocks": 1, "num_attention_heads": 4,
             "ext_pw_out_channel": 32, "depthwise_separable_out_channel": 32, "nemo_conv_channels": 16,
             "audio_token_id": 101}
    cfg = Phi4MultimodalConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                               eos_token_id=[2], vision_config=vision, audio_config=audio)
    torch.manual_seed(0)
    return Phi4MultimodalForCausalLM(cfg).eval()


def test_prefixed_image_and_audio_inputs_counted_by_the_merge_put_both_towers_in_the_forward():
    """Phi-4 multimodal keeps its placeholder ids on the towers' sub-configs, takes ``image_pixel_values``
    and ``audio_input_features`` and has no helper that counts features: its images come as HD crops (a
    global view and one crop, ``image_sizes`` a tensor, each tile's patch mask), its audio with
    ``audio_embed_sizes``, each with as many placeholders as its merge (``index_put``) reports: 2 x (2 + 1)
    + 1 + 2 x (2 + 1) per image (2 x 2 tokens a crop, a separator a row, one between the views), 64 / 8
    frames of audio. Its vision attention says is_causal, so SDPA in eager mode (no mask) and the exported
    graph (a mask) differ: it is draft-exported with eager attention. Both towers move."""
    model = _tiny_phi4_multimodal()
    inputs = default_example_inputs(model)
    assert inputs["image_pixel_values"].shape == (2, 2, 3, 28, 28)
    assert inputs["image_sizes"].tolist() == [[28, 28]] * 2 and inputs["image_attention_mask"].shape == (2, 2, 4, 4)
    assert inputs["audio_input_features"].shape == (2, 64, 80) and inputs["audio_embed_sizes"] == [8, 8]
    assert (inputs["input_ids"] == 100).sum(1).tolist() == [13, 13]
    assert (inputs["input_ids"] == 101).sum(1).tolist() == [8, 8]
    spec = pg.compile(model)
    assert "eager attention" in spec.info["attention"] and "text_only_inputs" not in spec.info
    embed = "model.embed_tokens_extend."
    assert _moves(spec, embed + "image_embed.img_processor.encoder.layers.0.mlp.fc1.weight")
    assert _moves(spec, embed + "audio_embed.encoder.encoders.0.feed_forward_in.gate_up_proj.weight")
    assert pg.verify(model, spec).ok  # (the exact check traces again: the benchmark's row runs it)


def test_vlm_that_reads_image_sizes_as_a_tensor_gets_a_tensor():
    """Apertus 1.5 tokenizes each image at its own size, read with ``image_sizes.tolist()`` (the list that
    Mistral 3 takes fails there): ``image_sizes`` a tensor, with as many image tokens as its VQ tokenizer
    gives (a 32-pixel image, 16 pixels a code: 4)."""
    from transformers import Apertus1p5Config, Apertus1p5ForConditionalGeneration

    cfg = Apertus1p5Config(
        text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 4, "bos_token_id": 1, "eos_token_id": 2,
                     "pad_token_id": 3},
        vision_config={"base_channels": 32, "channel_multiplier": [1, 1, 1, 1, 1], "num_res_blocks": 1,
                       "latent_channels": 32, "embed_dim": 16, "codebook_size": 16},
        audio_config={"hidden_size": 32, "codebook_dim": 32, "codebook_size": 16, "num_filters": 4},
        image_token_id=120, audio_token_id=121, image_token_offset=64, audio_token_offset=80)
    torch.manual_seed(0)
    model = Apertus1p5ForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model, modalities=("image",))
    assert isinstance(inputs["image_sizes"], torch.Tensor) and inputs["image_sizes"].tolist() == [[32, 32]] * 2
    assert int((inputs["input_ids"] == 120).sum()) == 2 * 4
    with torch.no_grad():
        model(**inputs)


def test_vlm_without_a_vision_tower_that_reads_packed_patches_gets_them():
    """NeoMME embeds the batch's image patches as one list ``(patches, C * P * P)`` (no vision config; Fuyu's
    ``(batch, 16, C * P * P)`` fails its placeholder check): 32 packed patches, 16 image tokens per sample;
    the patch embedding moves."""
    from transformers import NeoMMEConfig, NeoMMEForMaskedLM

    cfg = NeoMMEConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=8,
                       layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = NeoMMEForMaskedLM(cfg).eval()
    inputs = default_example_inputs(model)
    assert inputs["pixel_values"].shape == (32, 3 * 8 * 8)
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 32
    spec = pg.compile(model)
    assert any(_moves(spec, p) for p in spec.shapes if "patch_embeddings" in p and p.endswith("weight"))
    assert pg.verify(model, spec, promote_float32=True).ok


def test_moe_vlm_routing_image_tokens_to_vision_experts_gets_them_marked():
    """ERNIE 4.5 VL routes the tokens that ``moe_mm_token_type_ids`` marks to its vision experts: derived
    inputs mark the image tokens there, and the vision experts then change the outputs (unused before)."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    text = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "moe_intermediate_size": [96, 64], "moe_k": 2,
            "moe_num_experts": 4, "moe_num_shared_experts": 1, "max_position_embeddings": 128,
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default", "mrope_section": [3, 3, 2]}}
    vision = {"depth": 1, "hidden_size": 64, "num_heads": 4, "intermediate_size": 96, "patch_size": 14}
    cfg = Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, image_token_id=253, image_start_token_id=255,
                               image_end_token_id=254, video_token_id=250, video_start_token_id=252,
                               video_end_token_id=251)
    torch.manual_seed(0)
    model = Ernie4_5_VLMoeForConditionalGeneration(cfg).eval()
    inputs = default_example_inputs(model)
    marks = inputs["moe_mm_token_type_ids"]
    assert marks.sum() > 0 and torch.equal(marks, (inputs["input_ids"] == 253).long())
    with torch.no_grad():
        before = model(**inputs).logits
        for name, p in model.named_parameters():
            if ".vision_moe.experts." in name:
                p.copy_(torch.randn_like(p))
        assert not torch.allclose(model(**inputs).logits, before)
