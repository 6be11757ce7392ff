"""Tracing past data-dependent guards: draft export, and multimodal RoPE positions derived eagerly."""
import torch

import permgraph as pg


def _plain_export_fails(model: torch.nn.Module, args: tuple, covers: str) -> None:
    """Plain (non-strict) export stops at a data-dependent guard; else the test ``covers`` nothing."""
    try:
        torch.export.export(model, args, strict=False)
        raise AssertionError(f"plain export traced it: the test no longer covers {covers}")
    except Exception as e:  # noqa: BLE001 - the guard error torch raises
        assert "data-dependent" in str(e) or "DataDependent" in type(e).__name__, e


class _Branchy(torch.nn.Module):
    """The forward picks a layer from a tensor's value: export cannot decide the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(6, 10), torch.nn.Linear(10, 4), torch.nn.Linear(10, 4)

    def forward(self, x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h) if int(flag.sum()) > 0 else self.c(h)


def test_data_dependent_branch_is_traced_by_draft_export_and_said_so():
    model = _Branchy().double()
    x, flag = torch.randn(3, 6, dtype=torch.float64), torch.ones(2, dtype=torch.long)
    _plain_export_fails(model, (x, flag), "draft export")
    spec = pg.compile(model, (x, flag))
    assert "draft_export" in spec.info["draft"] and "draft_export" in pg.explain(model, (x, flag))
    assert [g.size for g in spec.groups.values()] == [10]  # a's units, with b (the branch taken)
    assert all(isinstance(t, pg.ir.Fixed) for t in spec.axes["c.weight"])  # the branch not taken
    for seed in (0, 1):
        assert pg.verify(model, spec, (x, flag), seed=seed, tolerance=1e-12).ok


def test_verify_retraces_the_way_compile_traced_and_a_stale_hint_falls_back(monkeypatch):
    """``spec.info["traced_with"]`` names the rung that traced the model; verify's retrace tries it first
    (here draft export, without the non-strict, strict and other tries that fail before it). A rung that does
    not apply or fails is passed over: the usual order follows."""
    import importlib

    trace_mod, verify_mod = importlib.import_module("permgraph.trace"), importlib.import_module("permgraph.verify")

    model = _Branchy().double()
    x, flag = torch.randn(3, 6, dtype=torch.float64), torch.ones(2, dtype=torch.long)
    spec = pg.compile(model, (x, flag))
    assert spec.info["traced_with"] == "draft"
    firsts, exports = [], []
    real_trace, real_export = trace_mod.trace, torch.export.export

    def recording_trace(*args, **kwargs):
        firsts.append(kwargs.get("first"))
        return real_trace(*args, **kwargs)

    def counting_export(*args, **kwargs):
        exports.append(kwargs.get("strict"))
        return real_export(*args, **kwargs)

    monkeypatch.setattr(verify_mod, "trace", recording_trace)
    monkeypatch.setattr(torch.export, "export", counting_export)
    assert pg.verify(model, spec, (x, flag), promote_float32=True).ok
    assert firsts == ["draft"] and exports == []  # no plain export tried: draft first, and it worked
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    xs = (torch.randn(3, 4, dtype=torch.float64),)
    assert pg.compile(plain, xs).info["traced_with"] == "non-strict"
    assert real_trace(plain, xs, first="strict").info["traced_with"] == "strict"
    assert real_trace(plain, xs, first="dense experts").info["traced_with"] == "non-strict"  # does not apply
    exports.clear()
    assert real_trace(model, (x, flag), first="strict").info["traced_with"] == "draft"  # fails: the usual order
    assert len(exports) >= 2


class _MaskedCheck(torch.nn.Module):
    """Rows picked by a boolean mask, their count checked against a length read from the data (a VLM's
    placeholder check): only draft export gets past the check, and only with the mask's rows taken
    through ``nonzero`` (torch 2.13's draft export cannot bind a boolean mask's size)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 10), torch.nn.Linear(10, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rows = x[mask]
        if rows.shape[0] != sum(lengths.tolist()):
            raise ValueError("rows and lengths differ")
        out = x.clone()
        out[mask] = rows * 2  # a boolean mask written through too
        return self.b(torch.relu(self.a(out))).sum(0) + self.b(torch.relu(self.a(rows))).sum(0)


def test_boolean_masks_are_traced_by_draft_export_through_nonzero():
    from permgraph.equivalents import BoolMasksAsIndices

    model = _MaskedCheck().double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    inputs = (x, mask, torch.tensor([3, 4]))
    with torch.no_grad():
        want = model(*inputs)
        wheres = [torch.where(mask), mask.nonzero(as_tuple=True), torch.nonzero(mask[0], as_tuple=True)]
        with BoolMasksAsIndices():  # the same function
            assert torch.equal(model(*inputs), want)
            got = [torch.where(mask), mask.nonzero(as_tuple=True), torch.nonzero(mask[0], as_tuple=True)]
    assert all(len(a) == len(b) and all(map(torch.equal, a, b)) for a, b in zip(got, wheres))
    spec = pg.compile(model, inputs)
    assert "draft_export" in spec.info["draft"]
    assert [g.size for g in spec.groups.values()] == [10]
    for seed in (0, 1):
        assert pg.verify(model, spec, inputs, seed=seed, tolerance=1e-12).ok


def test_qwen2_vl_gets_mrope_positions_and_its_vision_tower_moves():
    """Qwen2-VL computes M-RoPE positions from the image grid's values in Python; derived inputs pass
    them precomputed (and cu_seqlens), and eager attention gets past the vision tower's per-image
    chunks without specialising on the example (draft export did before)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from permgraph.inputs import default_example_inputs

    cfg = Qwen2VLConfig(
        image_token_id=100, video_token_id=101, vision_start_token_id=102,
        text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3})
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval().double()
    inputs = default_example_inputs(model)
    assert inputs["position_ids"].shape[0] == 3 and (inputs["input_ids"] == 100).sum() > 0
    spec = pg.compile(model)
    assert "attention" in spec.info and "draft" not in spec.info and "cu_seqlens" in inputs
    for p in ("model.visual.blocks.0.mlp.fc1.weight", "model.visual.merger.mlp.0.weight"):
        assert all(not isinstance(t, pg.ir.Fixed) for t in spec.axes_of(p)), (p, spec.axes_of(p))
    assert pg.verify(model, spec, promote_float32=True).ok


def test_qwen3_vl_vision_tower_traced_with_precomputed_helpers_and_eager_attention():
    """Qwen3-VL's vision tower resamples its position table and splits attention per image from the
    grid's values: derived inputs pass the helpers' results precomputed (interp_indices, cu_seqlens),
    and the export that fails with SDPA (``is_causal`` from each chunk's length) passes with eager
    attention; the model keeps its SDPA. Before: text-only inputs, the tower fixed as unused."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from permgraph.inputs import default_example_inputs

    cfg = Qwen3VLConfig(
        image_token_id=255, video_token_id=254, vision_start_token_id=253, vision_end_token_id=252,
        text_config={"vocab_size": 256, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 32,
                       "num_position_embeddings": 64, "deepstack_visual_indexes": [1]})
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(cfg).eval().double()
    assert {"interp_indices", "cu_seqlens"} <= set(default_example_inputs(model))
    spec = pg.compile(model)
    assert "'sdpa'" in spec.info["attention"] and "text_only_inputs" not in spec.info
    assert model.config._attn_implementation == "sdpa"
    for p in ("model.visual.blocks.0.mlp.linear_fc1.weight", "model.visual.merger.linear_fc1.weight"):
        assert all(not isinstance(t, pg.ir.Fixed) for t in spec.axes_of(p)), (p, spec.axes_of(p))
    assert pg.verify(model, spec, promote_float32=True).ok


def test_qwen3_5_vision_helpers_precomputed_under_the_image_prefix():
    """Qwen3.5's vision helpers take their results precomputed too, but an unprefixed ``cu_seqlens``
    also reaches its text model's linear attention (packed sequences: the forward fails); transformers
    strips an ``image_`` prefix for the vision tower alone, so derived inputs pass them prefixed.
    Before: text-only inputs, the vision tower fixed as unused (coverage 0.75)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from permgraph.inputs import default_example_inputs

    cfg = Qwen3_5Config(
        image_token_id=255, video_token_id=254, vision_start_token_id=253, vision_end_token_id=252,
        text_config={"vocab_size": 256, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                     "layer_types": ["linear_attention", "full_attention"], "linear_num_value_heads": 4,
                     "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                         "mrope_section": [1, 1, 0]}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 32,
                       "num_position_embeddings": 64})
    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration(cfg).eval().double()
    inputs = default_example_inputs(model)
    assert {"image_interp_indices", "image_cu_seqlens"} <= set(inputs) and "cu_seqlens" not in inputs
    spec = pg.compile(model)
    assert "text_only_inputs" not in spec.info and spec.covered_fraction() > 0.99
    assert all(not isinstance(t, pg.ir.Fixed) for t in spec.axes_of("model.visual.blocks.0.mlp.linear_fc1.weight"))
    assert pg.verify(model, spec, promote_float32=True).ok


def test_moe_with_eager_experts_is_traced_with_batched_experts_and_left_eager():
    """Eager experts loop over ``torch.where`` (data-dependent sizes); the batched experts compute
    the same function without them. The model is handed back with its eager experts."""
    from permgraph.testing.zoo import build

    model = build("mixtral").model
    model.set_experts_implementation("eager")
    spec = pg.compile(model)
    assert model.config._experts_implementation == "eager"
    assert "batched_mm" in spec.info["experts"] and "draft" not in spec.info
    assert any(g.endswith("experts") for g in spec.groups), list(spec.groups)
    for seed in (0, 1):
        assert pg.verify(model, spec, seed=seed, promote_float32=True).ok


def test_moe_with_grouped_experts_is_traced_with_batched_experts_and_left_grouped():
    """transformers 5 gives a MoE ``grouped_mm`` experts by default: tokens sorted by expert into an
    opaque grouped matmul (on CPU a custom op), which fixed every axis it touched (coverage 0.21). The
    batched experts compute the same function; the float32 model keeps its grouped experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=60, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    assert model.config._experts_implementation == "grouped_mm"
    spec = pg.compile(model)
    assert model.config._experts_implementation == "grouped_mm"
    assert "'grouped_mm'" in spec.info["experts"] and not spec.unknown_ops
    assert spec.covered_fraction() > 0.99
    assert spec.groups["model.layers.0.mlp.experts"].size == 4
    for seed in (0, 1):  # in float64 (grouped_mm has no float64 kernel: verify's copy runs batched)
        assert pg.verify(model, spec, seed=seed, promote_float32=True).ok
    assert pg.verify(model, spec, dtype=torch.float32).ok  # the grouped experts themselves
    assert model.config._experts_implementation == "grouped_mm"


def test_multimodal_model_whose_tower_cannot_be_traced_falls_back_to_text_inputs():
    """A tower that export cannot trace (here: a dict keyed by a tensor's value) leaves the model
    compiled on text-only derived inputs, the tower fixed as unused, and verify on the same inputs."""
    from permgraph.inputs import default_example_inputs
    from permgraph.testing.zoo import tiny_audio_lm

    model = tiny_audio_lm("audioflamingo3")
    assert "input_features" in default_example_inputs(model)
    assert "input_features" not in default_example_inputs(model, modalities=False)
    conv = model.model.audio_tower.conv1
    signs = {0: 1.0, 1: 1.0}
    plain = conv.forward
    conv.forward = lambda x: plain(x) * signs[(x > 0).sum().item() % 2]  # untraceable, same values
    spec = pg.compile(model)
    assert "text-only" in spec.info["text_only_inputs"] and "TraceError" in spec.info["text_only_inputs"]
    assert not any(t.groups() for t in spec.axes_of("model.audio_tower.layers.0.fc1.weight"))  # unused: fixed
    assert "text-only" in pg.explain(model)
    assert pg.verify(model, spec, promote_float32=True).ok


def test_model_that_builds_no_default_mask_while_exported_gets_an_all_ones_mask():
    """LongT5 builds its default attention mask only outside export and then splits a None mask
    into blocks; an all-ones mask (what no mask means) is passed instead, and verify's exact check
    runs the graph on the inputs it was traced with."""
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    cfg = LongT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1,
                       num_heads=4, local_radius=2, global_block_size=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = LongT5ForConditionalGeneration(cfg).eval().double()
    spec = pg.compile(model)
    assert "attention_mask" in spec.info["inputs"] and "attention_mask" in pg.explain(model)
    assert spec.covered_fraction() > 0.9
    for seed in (0, 1):
        assert pg.verify(model, spec, seed=seed, promote_float32=True).ok
    # activation matching runs the same graph on the user's batches: the mask is added there too
    import copy

    from permgraph.inputs import default_example_inputs

    other = copy.deepcopy(model)
    other.load_state_dict(pg.apply_permutation(spec, spec.random_permutation(2), model.state_dict()))
    al = pg.align(model, other, spec, solver="activation_matching", data=[default_example_inputs(model)])
    moved = pg.apply_alignment(al, model)
    assert all(torch.equal(moved[k], v) for k, v in other.state_dict().items())


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().double()


def test_switch_transformers_expert_dict_is_traced_densely():
    """Switch Transformers: the encoder reads a None attention_mask under export (all-ones one
    passed), the router converts its classifier to float32 inside forward (done before export), and
    the experts are a dict of modules looped over ``nonzero`` (computed densely)."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1)
    torch.manual_seed(0)
    model = _perturbed(SwitchTransformersForConditionalGeneration(cfg))
    assert model.encoder.block[0].layer[1].mlp.router.classifier.weight.dtype == torch.float64
    spec = pg.compile(model)
    assert "dense experts" in spec.info["experts"] and "SwitchTransformersExperts: dict" in spec.info["experts"]
    assert "attention_mask" in spec.info["inputs"] and "router.classifier.to(torch.float32)" in spec.info["converted"]
    assert "draft" not in spec.info and not spec.unknown_ops
    assert spec.groups["encoder.block.0.layer.1.mlp.experts.expert_2"].size == 48
    for seed in (0, 1):
        assert pg.verify(model, spec, seed=seed, promote_float32=True).ok


def test_longcat_bank_experts_with_identity_experts_are_traced_densely():
    """LongCat-Flash's experts (no experts_implementation: ids past the banks are zero-compute
    identity experts) loop over ``nonzero``; traced as batched banks plus identity, the same function."""
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    cfg = LongcatFlashConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, expert_ffn_hidden_size=16,
                             num_layers=1, num_attention_heads=4, n_routed_experts=4, zero_expert_num=2,
                             moe_topk=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                             v_head_dim=8, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = _perturbed(LongcatFlashForCausalLM(cfg))
    spec = pg.compile(model)
    assert "LongcatFlashExperts: bank" in spec.info["experts"] and "draft" not in spec.info
    assert spec.covered_fraction() > 0.99
    for seed in (0, 1):
        assert pg.verify(model, spec, seed=seed, promote_float32=True).ok


def test_dbrx_flat_glu_experts_are_traced_densely_with_experts_and_their_units():
    """DBRX's experts keep w1, v1, w2 flat, (E * I, H), and loop over ``nonzero``; traced as batched
    experts (each token-slot gathers its expert's rows), so the experts are a group and each expert
    permutes its own hidden units (was: export failed)."""
    from transformers import DbrxConfig, DbrxForCausalLM

    cfg = DbrxConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=64,
                     attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                     ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2))
    torch.manual_seed(0)
    model = _perturbed(DbrxForCausalLM(cfg))
    spec = pg.compile(model)
    assert "DbrxExperts: glu" in spec.info["experts"] and "draft" not in spec.info
    roles = {g.role for g in spec.groups.values()}
    assert {"experts", "units"} <= roles, spec.groups
    assert spec.covered_fraction() > 0.99
    for seed in (0, 1):
        assert pg.verify(model, spec, seed=seed, promote_float32=True).ok


def test_vilt_visual_embed_failure_names_the_construct_and_the_input_to_pass():
    """ViLT sizes each image's position table from pixel_mask's values and samples patches with
    torch.multinomial: no export traces it; the message says so and names ``image_embeds``, which
    the forward takes instead (and then traces)."""
    import pytest
    from transformers import ViltConfig, ViltModel

    from permgraph.errors import TraceError
    from permgraph.inputs import default_example_inputs

    cfg = ViltConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=48, image_size=64, patch_size=16, max_position_embeddings=32)
    torch.manual_seed(0)
    model = _perturbed(ViltModel(cfg))
    with pytest.raises(TraceError) as err:
        pg.compile(model)
    msg = str(err.value)
    assert "`visual_embed` (modeling_vilt.py" in msg and "torch.multinomial" in msg, msg
    assert "pass `image_embeds` in example_inputs" in msg, msg
    ex = default_example_inputs(model)
    mask = torch.ones(ex["pixel_values"].shape[0], *ex["pixel_values"].shape[2:], dtype=torch.long)
    with torch.no_grad():
        embeds, masks, _ = model.embeddings.visual_embed(ex["pixel_values"], mask, cfg.max_image_length)
    inputs = {"input_ids": ex["input_ids"], "image_embeds": embeds, "pixel_mask": masks}
    spec = pg.compile(model, inputs)
    assert spec.groups and pg.verify(model, spec, inputs, promote_float32=True).ok


def test_a_model_without_experts_is_not_traced_as_batched_experts():
    """Gemma 4's vision tower comes from a modeling file with MoE experts (so transformers lets it set
    an experts implementation) but has none: it is traced plainly, and no experts note is made."""
    from transformers import Gemma4VisionConfig, Gemma4VisionModel

    cfg = Gemma4VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16)
    model = Gemma4VisionModel(cfg)
    assert model._can_set_experts_implementation()
    spec = pg.compile(model)
    assert "experts" not in spec.info and spec.groups


def _nemotron3_diarization_encoder(kv_heads: int):
    from transformers import Nemotron3DiarizationAudioConfig, Nemotron3DiarizationAudioModel

    cfg = Nemotron3DiarizationAudioConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=kv_heads, num_mel_bins=16,
                                          subsampling_factor=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return _perturbed(Nemotron3DiarizationAudioModel(cfg)).double()


def test_attention_that_runs_only_on_sdpas_mask_skipping_path_names_the_construct():
    """Nemotron3's diarization encoder sizes v_proj by the query heads and k_proj by the key/value
    heads: eager SDPA with no mask broadcasts each to the query heads, but under export transformers
    builds the mask, and then repeats both by one factor (as eager attention always does), so export
    fails in sdpa_attention_forward. The message says that; with a key/value head per head it compiles."""
    import pytest

    from permgraph.errors import TraceError

    with pytest.raises(TraceError) as err:
        pg.compile(_nemotron3_diarization_encoder(kv_heads=2))
    msg = str(err.value)
    assert "fails with transformers' eager attention" in msg and "skips a mask" in msg, msg
    model = _nemotron3_diarization_encoder(kv_heads=4)
    spec = pg.compile(model)
    assert any(t.groups() for t in spec.axes_of("layers.0.self_attn.v_proj.weight"))
    assert pg.verify(model, spec, promote_float32=True).ok


def test_a_kv_cache_the_forward_returns_whatever_use_cache_says_is_left_out():
    """A forward that returns a KV cache with its outputs (DiffusionGemma's encoder hands its decoder one)
    cannot be exported as it is: the cache is left out of the outputs, the rest traced and sound."""
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class CacheReturning(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return CausalLMOutputWithPast(logits=self.down(torch.relu(self.up(x))), past_key_values=DynamicCache())

    torch.manual_seed(0)
    model = CacheReturning(PretrainedConfig()).eval()
    x = torch.randn(2, 8)
    spec = pg.compile(model, (x,))
    assert spec.info["outputs"] == ["logits"]
    assert any(t.groups() for t in spec.axes_of("up.weight"))
    assert pg.verify(model, spec, (x,)).ok
    assert "forward" not in vars(model)  # the forward as it was


class _PaddedConv(torch.nn.Module):
    """A conv whose right padding is computed from integer buffers that the state dict does not hold
    (EnCodec's, Mimi's: ``ceil((length - kernel) / stride + 1) - 1`` frames): lifted by export, the
    buffers' values are unknown, so the padding is a data-dependent size. ``overwrite``: the forward
    writes one of them first (the literals would not see the write)."""

    def __init__(self, overwrite: bool = False) -> None:
        super().__init__()
        self.conv, self.out = torch.nn.Conv1d(3, 8, 4, stride=2), torch.nn.Conv1d(8, 2, 1)
        self.register_buffer("stride", torch.tensor(2), persistent=False)
        self.register_buffer("kernel", torch.tensor(4), persistent=False)
        self.overwrite = overwrite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.overwrite:
            self.kernel.fill_(5)
        frames = torch.ceil((x.shape[-1] - self.kernel) / self.stride + 1).to(torch.int64) - 1
        extra = frames * self.stride + self.kernel - x.shape[-1]
        if extra > 0:  # a branch on the value: strict export cannot take it either
            x = torch.nn.functional.pad(x, (0, int(extra)))
        return self.out(torch.relu(self.conv(x)))


def test_padding_computed_from_integer_buffers_is_traced_with_the_buffers_as_literals():
    model, x = _PaddedConv().double(), torch.randn(2, 3, 9, dtype=torch.float64)
    _plain_export_fails(model, (x,), "literal buffers")
    spec = pg.compile(model, (x,))
    assert spec.info["traced_with"] == "literal buffers"
    assert "2 integer buffers" in spec.info["constants"] and "draft" not in spec.info
    assert type(model) is _PaddedConv and set(model._buffers) == {"stride", "kernel"}  # handed back as it was
    assert [g.size for g in spec.groups.values()] == [8]  # the conv's channels
    for seed in (0, 1):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-12).ok
    assert pg.verify(model, spec, (x,), promote_float32=True).ok  # the retrace takes the same rung


def test_a_forward_that_writes_its_integer_buffer_is_not_traced_with_literals():
    """The literal graph reads the value the buffer had (padding 1); the forward writes 5 first (padding 0):
    the graph does not give the model's outputs, so the literals are dropped and draft export traces it."""
    model, x = _PaddedConv(overwrite=True).double(), torch.randn(2, 3, 9, dtype=torch.float64)
    spec = pg.compile(model, (x,))
    assert spec.info["traced_with"] == "draft" and "constants" not in spec.info
    assert pg.verify(model, spec, (x,), seed=0, tolerance=1e-12).ok


class _EntropyGate(torch.nn.Module):
    """Outputs scaled by the entropy of a categorical over the logits (BLT's patching entropy):
    ``torch.distributions`` checks the logits' values first, a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 10), torch.nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.b(torch.relu(self.a(x)))
        return logits * torch.distributions.Categorical(logits=logits).entropy().unsqueeze(-1)


def test_distribution_value_checks_are_off_while_tracing_and_restored():
    from torch.distributions import Distribution

    model, x = _EntropyGate().double(), torch.randn(3, 6, dtype=torch.float64)
    assert Distribution._validate_args  # torch's default: the check runs
    _plain_export_fails(model, (x,), "distribution checks off")
    spec = pg.compile(model, (x,))
    assert spec.info["traced_with"] == "non-strict" and "draft" not in spec.info
    assert Distribution._validate_args  # handed back
    assert [g.size for g in spec.groups.values()] == [10]  # a's units (the logits are the output)
    for seed in (0, 1):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-12).ok
