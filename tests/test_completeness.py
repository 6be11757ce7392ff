"""Every axis that is not a data axis is permuted, unless the architecture forbids it."""
import pytest
import torch

import permgraph as pg
from permgraph.compiler import compile_graph
from permgraph.ir import Cat, Fixed
from permgraph.testing.zoo import ZOO, build

# reasons an axis may legitimately stay fixed: data axes and true symmetry breakers
ALLOWED = ("embedding lookup", "model input", "model output", "convolution kernel", "spatial positions",
           "constant buffer 'gpt_neox.rotary_emb.inv_freq'", "constant buffer 'model.rotary_emb.inv_freq'",
           "constant buffer 'model.language_model.rotary_emb.inv_freq'",
           "values vary along the axis", "indexes fused segments", "indexed by unbind", "indexed by select",
           "unused in the traced forward")


@pytest.fixture(scope="module", params=sorted(ZOO))
def compiled(request, zoo_compiled):
    return zoo_compiled(request.param)


def test_only_data_axes_and_symmetry_breakers_are_fixed(compiled):
    zm, spec = compiled
    assert not spec.unknown_ops, spec.unknown_ops
    for f in spec.fixed:
        assert f.reasons and all(any(r.startswith(a) for a in ALLOWED) for r in f.reasons), (zm.name, f)


def test_every_weight_matrix_moves(compiled):
    zm, spec = compiled
    for p, shape in spec.shapes.items():
        if len(shape) == 2 and min(shape) > 1:
            assert any(not isinstance(t, Fixed) for t in spec.axes[p]), (zm.name, p)


def groups_by_role(spec):
    out = {}
    for g in spec.groups.values():
        out.setdefault(g.role, []).append(g)
    return out


def test_llama_gqa_rope_structure():
    zm = build("llama")
    spec = pg.compile(zm.model)
    roles = groups_by_role(spec)
    assert len(roles["heads"]) == 2 and all(g.size == 2 for g in roles["heads"])  # kv heads
    assert len(roles["q_per_kv"]) == 2 and all(g.ctx and g.size == 2 for g in roles["q_per_kv"])
    assert all(g.ctx == (h.name,) for g, h in zip(roles["vo"], roles["heads"]))
    assert "qk" not in roles  # RoPE fixes the q/k within-head order
    fixed = {(f.param, f.axis): f for f in spec.fixed}
    q = fixed[("model.layers.0.self_attn.q_proj.weight", 0)]
    assert "rotary_emb.inv_freq" in " ".join(q.reasons) and q.part.startswith("factor")
    assert len([g for g in spec.groups.values() if g.role == ""]) == 3  # residual + 2 MLPs


def test_gpt2_fused_qkv_has_separate_qk_and_vo():
    spec = pg.compile(build("gpt2").model)
    roles = groups_by_role(spec)
    assert len(roles["qk"]) == 2 and len(roles["vo"]) == 2 and len(roles["heads"]) == 2
    tree = spec.axes["transformer.h.0.attn.c_attn.weight"][1]
    assert isinstance(tree, Cat) and len(tree.parts) == 3  # q | k | v segments


def test_gpt_neox_partial_rotary_keeps_pass_dims_free():
    spec = pg.compile(build("gpt_neox").model)
    within = [g for g in spec.groups.values() if g.ctx and g.role not in ("vo", "q_per_kv")]
    assert within and all(g.size == 4 for g in within)  # 8 head dims, 4 rotary (fixed), 4 pass


def test_t5_shared_position_bias_ties_heads_across_layers():
    zm = build("t5")
    spec = pg.compile(zm.model, outputs=zm.outputs)
    enc_heads = [g for g in spec.groups.values() if g.role == "heads" and g.name.startswith("encoder")]
    assert len(enc_heads) == 1
    members = {m.param for m in spec.members(enc_heads[0].name)}
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in members
    assert "encoder.block.1.layer.0.SelfAttention.q.weight" in members
    # the cross-attention bias is a constant (zeros) reused by every layer: it ties nothing
    cross = [g for g in spec.groups.values() if g.role == "heads" and "EncDecAttention" in g.name]
    assert len(cross) == 2


def test_torch_mha_fused_in_proj_has_separate_qk_and_vo():
    """``nn.MultiheadAttention``'s packed ``in_proj`` (unflattened to ``(3, E)`` and selected) is its q | k | v
    segments, as GPT-2's split ``c_attn`` is: queries/keys and values get their own within-head groups."""
    zm = build("torch_encoder_post")
    spec = pg.compile(zm.model, zm.inputs)
    roles = groups_by_role(spec)
    assert len(roles["heads"]) == 2 and len(roles["qk"]) == 2 and len(roles["vo"]) == 2
    assert "qkvo" not in roles
    tree = spec.axes["encoder.layers.0.self_attn.in_proj_weight"][0]
    assert isinstance(tree, Cat) and len(tree.parts) == 3


def test_clip_projection_outputs_fixed_residuals_free():
    zm = build("clip")
    spec = pg.compile(zm.model, outputs=zm.outputs)
    names = set(spec.groups)
    assert "residual[text_model]" in names and "residual[vision_model]" in names
    unmoved = {p for p, trees in spec.axes.items() if all(isinstance(t, Fixed) for t in trees)}
    assert unmoved == {"logit_scale"}


def test_default_outputs_keep_task_outputs_and_free_hidden_and_pooled_states():
    from permgraph.compiler import default_outputs

    # a VLM's projected image features (LFM-VL: image_pooler_output) are a hidden state, not a task output
    assert default_outputs(["logits", "image_pooler_output"]) == ["logits"]
    assert default_outputs(["logits", "past_key_values.0", "hidden_states.1", "text_model_output.pooler_output",
                            "text_embeds"]) == ["logits", "text_embeds"]
    # one pooled state per image (Inkling 2: image_outputs.pooler_output.0, .1), not the pooler's task outputs
    assert default_outputs(["logits", "image_outputs.last_hidden_state", "image_outputs.pooler_output.0",
                            "image_outputs.pooler_output.1"]) == ["logits"]
    assert default_outputs(["logits", "pooler_output_scores"]) is None
    # whatever a tower returns (Cohere Compass: deepstack features per image) is not a task output
    assert default_outputs(["logits", "image_outputs.last_hidden_state", "image_outputs.deepstack_features.0.0",
                            "language_model_outputs.logits"]) == ["logits", "language_model_outputs.logits"]
    assert default_outputs(["last_hidden_state", "pooler_output"]) is None  # no task head: all fixed
    assert default_outputs(["logits"]) is None


def test_dual_encoder_default_outputs_free_the_towers_pooled_states():
    """The plain call on a CLIP-like model: logits and projected embeddings stay fixed, the
    towers' hidden and pooled states (``vision_model_output.pooler_output``) may move, so both
    residual streams are groups; the permuted model keeps the task outputs exactly."""
    zm = build("clip")
    spec = pg.compile(zm.model, zm.inputs)
    fixed = set(spec.info["fixed_outputs"])
    assert {"logits_per_image", "text_embeds", "image_embeds"} <= fixed
    assert not any(n.endswith("pooler_output") or "hidden_state" in n for n in fixed)
    assert "residual[text_model]" in spec.groups and "residual[vision_model]" in spec.groups
    assert pg.verify(zm.model, spec, zm.inputs, promote_float32=True).ok


def test_moe_experts_are_a_group_and_expert_products_are_not_attention(zoo_compiled):
    """Mixtral: the router rows move with the experts (a group of whole experts); the batched expert
    products multiply activations by (indexed) weights, so they name no attention roles."""
    zm, spec = zoo_compiled("mixtral")
    experts = [g for g in spec.groups.values() if g.role == "experts"]
    assert len(experts) == 2 and all(g.size == 4 for g in experts)
    members = {m.param.removesuffix(".weight").rsplit(".", 1)[-1] for g in experts for m in spec.members(g.name)}
    assert members == {"gate", "down_proj", "gate_up_proj"}  # router rows and both expert weights
    assert "residual" in spec.groups
    assert not [g for g in spec.groups.values() if g.role in ("qk", "vo") and "self_attn" not in g.name]


class _ReadForShape(torch.nn.Module):
    """A hidden value sliced only for its shape (BART's ``inputs_embeds[:, :, -1]``), next to an
    in-place write whose result is otherwise unused (it must stay: it changes ``buf``) and a pooler
    whose output is dropped (it stays, so that its weights move with the hidden units they read)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.pool = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.pool(h[:, 0]).tanh()  # computed, then dropped (BERT's pooler under a masked-LM head)
        seq = h[:, :, -1].shape[1]
        buf = torch.zeros_like(h)
        buf[:, :1].copy_(h[:, :1] * 2)
        return self.b(h + buf) * seq


def test_a_value_read_only_for_its_shape_fixes_nothing():
    model, x = _ReadForShape().double(), torch.randn(2, 5, 4, dtype=torch.float64)
    spec = pg.compile(model, (x,))
    assert sorted(g.size for g in spec.groups.values()) == [5, 6], (spec.groups, spec.fixed)
    assert not any(isinstance(t, Fixed) for t in spec.axes["pool.weight"])
    assert not isinstance(spec.axes["a.weight"][0], Fixed)
    for seed in (0, 1):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-10).ok
    targets = {str(n.target) for n in compile_graph(model, (x,)).exported.graph.nodes}
    assert "aten.copy_.default" in targets and "aten.linear.default" in targets
    selects = [n for n in compile_graph(model, (x,)).exported.graph.nodes if n.target is torch.ops.aten.select.int]
    assert [n.args[2] for n in selects] == [0]  # the pooler's first token stays; h[:, :, -1] is gone


def test_vision_language_model_gets_image_inputs_and_its_vision_tower_moves(zoo_compiled):
    from permgraph.inputs import default_example_inputs

    zm, spec = zoo_compiled("llava")
    inputs = default_example_inputs(zm.model)
    per_image = (28 // 14) ** 2  # patches, CLS dropped ("default" feature strategy)
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 28, 28)
    assert ((inputs["input_ids"] == 63).sum(1) == per_image).all()
    for p in ("model.vision_tower.encoder.layers.0.mlp.fc1.weight",
              "model.multi_modal_projector.linear_1.weight"):
        assert all(not isinstance(t, Fixed) for t in spec.axes[p]), (p, spec.axes[p])
    assert spec.covered_fraction() >= 0.95


class _MultiQuery(torch.nn.Module):
    """Falcon's multi-query attention: one fused projection viewed as (heads + 2, head_dim), keys and
    values picked with constant index lists ``[..., [-2], :]`` and ``[..., [-1], :]``."""

    def __init__(self, heads: int = 4, hd: int = 3) -> None:
        super().__init__()
        self.heads, self.hd = heads, hd
        self.qkv, self.o = torch.nn.Linear(8, (heads + 2) * hd), torch.nn.Linear(heads * hd, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        f = self.qkv(x).view(b, t, self.heads + 2, self.hd)
        q, k, v = (z.transpose(1, 2) for z in (f[:, :, :-2], f[:, :, [-2]], f[:, :, [-1]]))
        k, v = k.expand(b, self.heads, t, self.hd), v.expand(b, self.heads, t, self.hd)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, self.heads * self.hd))


def test_constant_index_lists_of_consecutive_positions_are_slices():
    model, x = _MultiQuery().double(), torch.randn(2, 5, 8, dtype=torch.float64)
    spec = pg.compile(model, (x,))
    # query heads, and q/k apart from v/o within a head (the slices split the fused rows into segments)
    assert sorted((g.role, g.size) for g in spec.groups.values()) == [("heads", 4), ("qk", 3), ("vo", 3)], spec.groups
    assert not any("indexed by a tensor" in r for f in spec.fixed for r in f.reasons)
    for seed in (0, 1):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-10).ok


class _SlidingChunks(torch.nn.Module):
    """Longformer's sliding-chunk attention: (T, B, d) projections viewed as (B * heads, chunks, 2w,
    head_dim) through a transpose (not contiguous) and made to overlap by half a chunk with
    ``as_strided``; attention within each chunk."""

    def __init__(self, d: int = 8, heads: int = 2, w: int = 2) -> None:
        super().__init__()
        self.heads, self.w = heads, w
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def _chunk(self, z: torch.Tensor) -> torch.Tensor:
        t, b, d = z.shape
        z = z.view(t, b * self.heads, d // self.heads).transpose(0, 1)
        z = z.view(z.size(0), t // (2 * self.w), 2 * self.w, z.size(2))
        size, stride = list(z.size()), list(z.stride())
        size[1], stride[1] = size[1] * 2 - 1, stride[1] // 2
        return z.as_strided(size=size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        xt = x.transpose(0, 1)
        q, k, v = (self._chunk(f(xt)) for f in (self.q, self.k, self.v))
        y = torch.einsum("ncxy,ncyd->ncxd", torch.einsum("ncxd,ncyd->ncxy", q, k).softmax(-1), v).sum(1)
        y = y.view(b, self.heads, 2 * self.w, d // self.heads).transpose(1, 2).reshape(b, 2 * self.w, d)
        return self.o(y)


def test_overlapping_chunks_by_as_strided_keep_heads_and_head_dims_free():
    model, x = _SlidingChunks().double(), torch.randn(3, 8, 8, dtype=torch.float64)
    spec = pg.compile(model, (x,))
    assert not spec.unknown_ops, spec.unknown_ops
    assert sorted(g.size for g in spec.groups.values()) == [2, 4, 4], (spec.groups, spec.fixed)  # heads, qk, vo
    for seed in (0, 1):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-10).ok


def test_audio_language_model_gets_audio_inputs_and_its_audio_tower_moves():
    """Derived inputs of an audio-language model carry log-mel frames and as many audio tokens as
    its tower yields, so the tower is in the traced forward and its units are groups."""
    from permgraph.inputs import default_example_inputs
    from permgraph.testing.zoo import tiny_audio_lm

    model = tiny_audio_lm("audioflamingo3")
    inputs = default_example_inputs(model)
    assert inputs["input_features"].shape[:2] == (2, 16) and (inputs["input_ids"] == 100).sum() > 0
    spec = pg.compile(model)
    tower = [p for p in spec.shapes if ".audio_tower.layers." in p]
    assert tower and all(any(t.groups() for t in spec.axes_of(p)) for p in tower if p.endswith("fc1.weight"))
    assert pg.verify(model, spec, promote_float32=True).ok


def test_alibi_heads_are_fixed_but_each_keeps_its_own_within_head_permutations():
    """ALiBi gives every head its own slope, so heads cannot move; each head's q/k and v/o units
    still can, each head on its own (one group per head, not one shared by all heads)."""
    import dataclasses

    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = BloomForCausalLM(cfg).eval().double()
    x = torch.randint(0, 64, (2, 7))
    spec = pg.compile(model, (x,))
    within = [g for g in spec.groups.values() if g.role in ("qk", "vo", "qkvo")]
    assert all(g.size == 8 and not g.ctx for g in within), within
    for role in ("qk", "vo"):  # q/k apart from v/o: the fused (heads, 3, head_dim) rows split per head
        names = [g.name for g in within if g.role == role]
        assert len(names) == 2 * 4 and {n.rsplit(".head", 1)[1] for n in names} == {"0", "1", "2", "3"}, within
    for seed in (0, 1):
        assert pg.verify(model, spec, (x,), seed=seed, promote_float32=True).ok
    report = spec.explain()
    assert "self_attention.vo.head*  [0-1] vo per fixed head" in report, report  # one row for 8 groups
    assert "qk per fixed head" in report, report
    # the dense projection reading head 1's units with head 0's permutation: not a symmetry
    p = "transformer.h.0.self_attention.dense.weight"
    tree = spec.axes[p][1]
    assert isinstance(tree, Cat) and len(tree.parts) == 4
    swapped = Cat((tree.parts[1], tree.parts[0]) + tree.parts[2:])
    wrong = dataclasses.replace(spec, axes={**spec.axes, p: [spec.axes[p][0], swapped]})
    assert not pg.verify(model, wrong, (x,), seed=0, promote_float32=True).ok


@pytest.mark.parametrize("layout, roles", [
    ({"new_decoder_architecture": True, "num_kv_heads": 2}, {"heads": 2, "q_per_kv": 2, "vo": 2}),  # (kv, g+2, d)
    ({"multi_query": False}, {"heads": 2, "vo": 2}),  # (heads, 3, d), selects
    ({"multi_query": False, "alibi": True}, {"qk": 8, "vo": 8}),  # the same, heads fixed by ALiBi
])
def test_falcon_fused_layouts_give_values_their_own_within_head_groups(layout, roles):
    """Falcon's fused ``query_key_value`` in its three layouts: the value rows are segments of their own, so the
    values' within-head units move with the dense projection even where RoPE fixes the queries' and keys'."""
    from collections import Counter

    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **layout)
    torch.manual_seed(0)
    model = FalconForCausalLM(cfg).eval().double()
    x = torch.randint(0, 64, (2, 7))
    spec = pg.compile(model, (x,))
    got = Counter(g.role for g in spec.groups.values() if g.role)
    assert dict(got) == roles, (dict(got), spec.explain())
    for seed in (0, 1):
        assert pg.verify(model, spec, (x,), seed=seed, promote_float32=True).ok


@pytest.mark.parametrize("solver", ["weight_matching", "transfusion", "activation_matching"])
def test_alibi_per_head_groups_planted_permutation_is_recovered(solver):
    import copy

    from transformers import BloomConfig, BloomForCausalLM

    # a vocabulary several times the width anchors the stream, as in any real model: with 64 rows, a descent from
    # the identity on untrained weights can fit the MLP units to noise before the stream is solved
    torch.manual_seed(0)
    a = BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=32, n_layer=2, n_head=4)).eval().double()
    x = torch.randint(0, 256, (2, 7))
    spec = pg.compile(a, (x,))
    b = copy.deepcopy(a)
    b.load_state_dict(pg.apply_permutation(spec, spec.random_permutation(3), a.state_dict()))
    kw = {"data": [{"input_ids": x}]} if solver == "activation_matching" else {}  # the keyword form, as users pass it
    moved = pg.apply_alignment(pg.align(a, b, spec, solver=solver, **kw), a)
    assert all(torch.equal(moved[k], v) for k, v in b.state_dict().items())


def test_a_decoder_with_cross_attention_gets_encoder_states_and_its_cross_attention_moves():
    """Derived inputs of a decoder that attends to an encoder (TrOCR's decoder, a BERT built with
    ``add_cross_attention``) carry random encoder states, so the cross-attention is in the traced
    forward instead of fixed as unused."""
    from transformers import BertConfig, BertLMHeadModel

    from permgraph.inputs import default_example_inputs

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, is_decoder=True, add_cross_attention=True)
    model = BertLMHeadModel(cfg).eval().double()
    inputs = default_example_inputs(model)
    assert inputs["encoder_hidden_states"].shape == (2, 4, 16)
    spec = pg.compile(model)
    cross = [p for p in spec.shapes if ".crossattention." in p]
    assert cross and not any("unused" in r for f in spec.fixed for r in f.reasons), spec.fixed
    assert all(any(t.groups() for t in spec.axes_of(p)) for p in cross)
    assert pg.verify(model, spec, tolerance=1e-10).ok
    plain = BertLMHeadModel(BertConfig(**{**cfg.to_dict(), "add_cross_attention": False})).eval().double()
    assert "encoder_hidden_states" not in default_example_inputs(plain)  # ignored: not passed


def test_a_second_token_stream_gets_ids_and_its_encoder_moves():
    """Evolla reads proteins as ``protein_input_ids`` (with ``protein_attention_mask``) through an
    encoder of its own: derived inputs give ids from that encoder's vocabulary, so the encoder and the
    resampler are in the traced forward instead of fixed as unused."""
    from transformers import EvollaConfig, EvollaForProteinText2Text

    from permgraph.inputs import default_example_inputs

    cfg = EvollaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, aligner_num_add_layers=1, resampler_depth=1,
        resampler_dim_head=8, resampler_heads=2, resampler_num_latents=4, resampler_ff_mult=1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        protein_encoder_config=dict(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=24, max_position_embeddings=32))
    torch.manual_seed(0)
    model = EvollaForProteinText2Text(cfg).eval().double()
    with torch.no_grad():  # the cross-attention gates start at zero: the proteins would change nothing
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    inputs = default_example_inputs(model)
    assert inputs["protein_input_ids"].shape == (2, 8) and int(inputs["protein_input_ids"].max()) < 30
    spec = pg.compile(model)
    assert not any("unused" in r for f in spec.fixed for r in f.reasons), spec.fixed
    enc = [p for p in spec.shapes if ".protein_encoder." in p and p.endswith("intermediate.dense.weight")]
    assert enc and all(any(t.groups() for t in spec.axes_of(p)) for p in enc)
    assert pg.verify(model, spec, promote_float32=True, tolerance=1e-10).ok


class RepeatedKV(torch.nn.Module):
    """Keys and values repeated whole, ``k.repeat(1, g, 1, 1)`` (JetMoE's attention experts), not
    interleaved: the query heads are laid out ``(g, kv)``, the kv heads inner."""

    def __init__(self, d: int = 16, kv: int = 2, g: int = 3, hd: int = 4) -> None:
        super().__init__()
        self.g, self.hd = g, hd
        self.q = torch.nn.Linear(d, g * kv * hd)
        self.kv = torch.nn.Linear(d, 2 * kv * hd)
        self.o = torch.nn.Linear(g * kv * hd, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.hd).transpose(1, 2)
        k, v = (y.view(b, t, -1, self.hd).transpose(1, 2).repeat(1, self.g, 1, 1) for y in self.kv(x).chunk(2, -1))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.o(out.transpose(1, 2).reshape(b, t, -1))


def test_heads_repeated_whole_are_the_inner_factor():
    torch.manual_seed(0)
    model, x = RepeatedKV().double(), torch.randn(2, 5, 16, dtype=torch.float64)
    spec = pg.compile(model, (x,), outputs=[])
    roles = groups_by_role(spec)
    (heads,), (per,) = roles["heads"], roles["q_per_kv"]
    # the copies are outer, so one permutation of them is shared by the kv heads (a context must be outer)
    assert (heads.size, per.size) == (2, 3) and per.ctx == ()
    assert "kv.weight" in {m.param for m in spec.members(heads.name)}  # the kv heads move k and v
    assert "kv.weight" not in {m.param for m in spec.members(per.name)}
    for seed in range(3):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-12).ok
