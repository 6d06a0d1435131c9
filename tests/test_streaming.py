"""CPU tests of the streaming engine: leaf tensors, packing, and streamed == resident, bit for bit.

On a CPU device the engine runs its bookkeeping synchronously (same slots, hooks, prefetch order as
on CUDA, without streams and pinning). The helpers here are reused by test_streaming_gpu.py.
"""

from __future__ import annotations

import dataclasses
import gc
import types

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from krea_lite import compat
from krea_lite.errors import KreaLiteError
from krea_lite.packing import leaf_tensors, nbytes
from krea_lite.packing import pack as _pack
from krea_lite.placement import apply_plan
from krea_lite.plan import Sizes, measure, plan_for_budget
from krea_lite.streaming import HOOK_NAME


def is_streamed(block) -> bool:
    return compat.get_model_hook(block, HOOK_NAME) is not None

SCHEMES = ("nf4", "int8", "qint8", "qint4", "bf16")


def quantize_linear(linear: nn.Linear, scheme: str, device: str = "cpu") -> nn.Module:
    """`linear` (bf16) as the library module of `scheme`, quantized on `device`."""
    import bitsandbytes as bnb

    w, b = linear.weight.data.to(device), None if linear.bias is None else linear.bias.data.to(device)
    if scheme == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=b is not None, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True, module=q)
        q.support_avx512bf16_for_cpu = False  # the AVX512 path repacks weights in place on the first CPU forward
    elif scheme == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=b is not None, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    elif scheme in ("qint8", "qint4"):
        from optimum.quanto import freeze, qtypes, quantize

        holder = nn.Sequential(linear.to(device))
        quantize(holder, weights=qtypes[scheme])
        freeze(holder)
        return holder[0].requires_grad_(False)
    else:
        return linear.to(device).requires_grad_(False)
    if b is not None:
        q.bias = nn.Parameter(b, requires_grad=False)
    return nn.Module.to(q, device)  # bitsandbytes quantizes here


def quantize_blocks(blocks, schemes=SCHEMES, device: str = "cpu") -> None:
    """Replace the j-th Linear of every block by scheme schemes[j % len]: same layout in every block."""
    for block in blocks:
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        for j, name in enumerate(names):
            block.set_submodule(name, quantize_linear(block.get_submodule(name), schemes[j % len(schemes)], device))


def tiny_flux(schemes=SCHEMES, layers: int = 4, single_layers: int = 5, head_dim: int = 32, heads: int = 2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    rope = [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=64,
        pooled_projection_dim=64, axes_dims_rope=rope, guidance_embeds=True,
    ).to(torch.bfloat16).eval().requires_grad_(False)
    quantize_blocks(model.transformer_blocks, schemes)
    quantize_blocks(model.single_transformer_blocks, schemes)
    return model


def flux_inputs(device: str = "cpu", image_tokens: int = 16, text_tokens: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    out = dict(
        hidden_states=torch.randn(1, image_tokens, 64, generator=g), encoder_hidden_states=torch.randn(
            1, text_tokens, 64, generator=g), pooled_projections=torch.randn(1, 64, generator=g),
    )
    out = {k: v.to(device, torch.bfloat16) for k, v in out.items()}
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(image_tokens // 4), indexing="ij"), -1)
    return dict(out, timestep=torch.tensor([0.5], device=device), guidance=torch.tensor([3.5], device=device),
                img_ids=torch.cat([torch.zeros(image_tokens, 1), ids.reshape(-1, 2)], 1).to(device),
                txt_ids=torch.zeros(text_tokens, 3, device=device), return_dict=False)


def tiny_t5(schemes=("nf4", "int8", "qint8", "bf16")):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=256, num_layers=4, num_heads=4,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, dropout_rate=0.0)
    model = T5EncoderModel(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    quantize_blocks(model.encoder.block[1:], schemes)  # block 0 (relative attention bias) is laid out differently
    quantize_blocks(model.encoder.block[:1], schemes)
    return model


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def streamed_plan(pipe, double=(), single=(), prefetch=2, t5=False):
    base = plan_for_budget(measure(pipe), None)  # no CUDA here: no limit, everything resident
    return dataclasses.replace(base, streamed_double=tuple(double), streamed_single=tuple(single),
                               prefetch=prefetch, t5_streamed=t5)


# --- leaf_tensors and packing -------------------------------------------------------------------


def _one_linear(scheme: str) -> nn.Module:
    torch.manual_seed(0)
    return quantize_linear(nn.Linear(256, 128).to(torch.bfloat16), scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_leaf_tensors_cover_what_the_forward_reads(scheme):
    m = _one_linear(scheme)
    ids = {id(t) for t in leaf_tensors(m)}
    w = m.weight
    if scheme == "nf4":
        qs = w.quant_state
        expected = [w, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    elif scheme == "int8":
        expected = [w, w.CB, w.SCB]  # CB shares the weight's storage: packed once (see _layout)
    elif scheme == "qint8":
        expected = [w._data, w._scale, m.input_scale, m.output_scale]
    elif scheme == "qint4":
        expected = [w._data._data, w._scale_shift]  # TinyGemm (group 128, bf16): packed int4 + scale/shift
    else:
        expected = [w]
    assert all(id(t) in ids for t in [*expected, m.bias])
    assert all(type(t) is not torch.Tensor or not hasattr(type(t), "__tensor_flatten__") for t in leaf_tensors(m))
    if scheme == "int8":  # after the first forward bitsandbytes keeps CB/SCB in module.state
        m(torch.randn(2, 256, dtype=torch.bfloat16))
        ids = {id(t) for t in leaf_tensors(m)}
        assert id(m.state.CB) in ids and id(m.state.SCB) in ids


@pytest.mark.parametrize("scheme", SCHEMES)
def test_nbytes_counts_quantized_bytes_once(scheme):
    m = _one_linear(scheme)
    got = nbytes(leaf_tensors(m))
    weights = 128 * 256
    per_weight = {"nf4": 0.5, "int8": 1, "qint8": 1, "qint4": 0.5, "bf16": 2}[scheme]
    assert weights * per_weight <= got <= weights * per_weight + 8 * 256 + 2 * 128 * 4  # + scales, alignment


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pack_keeps_outputs_and_frees_the_original_storage(scheme):
    m = _one_linear(scheme)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        before = m(x)
    tensors = leaf_tensors(m)
    old = [StorageWeakRef(t.untyped_storage()) for t in tensors]
    buf = torch.empty(nbytes(tensors), dtype=torch.uint8)
    _pack(m, buf)
    gc.collect()
    assert all(r.expired() for r in old)
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    assert all(lo <= t.data_ptr() < hi for t in leaf_tensors(m))
    with torch.no_grad():
        assert same_bits(m(x), before)


# --- the engine on a tiny FLUX transformer --------------------------------------------------------


@pytest.fixture(scope="module")
def flux():
    model = tiny_flux()
    with torch.no_grad():
        ref = model(**flux_inputs())[0]
    return model, ref


def _expected_copies(n: int, p: int, steps: int) -> int:
    """Slot fills at placement, then one copy per block per step, except for blocks that are the only
    user of their slot (they stay there across steps)."""
    p = min(p, n)
    alone = sum(1 for pos in range(p) if pos + p >= n)
    return p + steps * (n - alone)


@pytest.mark.parametrize("double, single, prefetch", [
    ((1, 2, 3), (0, 1, 2, 3, 4), 2),  # nearly everything streamed, double buffering
    ((), (2, 3, 4), 1),  # one slot: no overlap, still exact
    ((0, 1, 2, 3), (1, 2, 3, 4), 3),
    ((3,), (), 2),  # one block, slots clamp to 1
    ((0, 2), (0, 2, 4), 2),  # spread out (plan_for_budget(spread=True)): resident blocks between streamed ones
])
def test_streamed_forward_equals_resident_bit_for_bit(flux, double, single, prefetch):
    model, ref = flux
    pipe = types.SimpleNamespace(transformer=model)
    originals = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    placement = apply_plan(pipe, streamed_plan(pipe, double, single, prefetch), "cpu")
    try:
        streamers = placement.streamers
        assert list(model.transformer_blocks) + list(model.single_transformer_blocks) == originals  # in place
        assert all(is_streamed(model.transformer_blocks[i]) for i in double)
        assert all(is_streamed(model.single_transformer_blocks[i]) for i in single)
        assert sum(map(is_streamed, originals)) == len(double) + len(single)
        slot_ptrs = {k: [s.data_ptr() for s in v.slots] for k, v in streamers.items()}
        with torch.no_grad():
            for step in range(3):
                assert same_bits(model(**flux_inputs())[0], ref), f"step {step}"
                for name, s in streamers.items():
                    assert [x.data_ptr() for x in s.slots] == slot_ptrs[name]  # slots allocated once
                    assert not s._waits  # no growth
                    st = s.stats()
                    n = len(double if name.endswith(".transformer_blocks") else single)
                    assert st["misses"] == 0
                    assert st["copies"] == _expected_copies(n, prefetch, step + 1)
                    assert st["bytes_copied"] == st["copies"] * st["slot_bytes"]
    finally:
        placement.close()
    assert list(model.transformer_blocks) + list(model.single_transformer_blocks) == originals
    assert not any(map(is_streamed, originals))
    with torch.no_grad():
        assert same_bits(model(**flux_inputs())[0], ref)


def test_placed_model_keeps_its_module_tree_and_state_dict(flux):
    """Streamed blocks stay in the tree; between calls their tensors are at home in the one host buffer,
    so state_dict() has the same keys and the same bytes as before placement."""
    model, _ = flux
    pipe = types.SimpleNamespace(transformer=model)
    names = [n for n, _ in model.named_modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    placement = apply_plan(pipe, streamed_plan(pipe, double=(2, 3), single=(0, 1, 2, 3, 4)), "cpu")
    try:
        with torch.no_grad():
            model(**flux_inputs())
        assert [n for n, _ in model.named_modules()] == names
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], v) for k, v in before.items() if not hasattr(type(v), "__tensor_flatten__"))
        s = placement.streamers["transformer.single_transformer_blocks"]
        assert s.host.numel() == s.n * s.stride  # one buffer, 1x the packed bytes (+ alignment)
        lo, hi = s.host.data_ptr(), s.host.data_ptr() + s.host.numel()
        for i in s.indices:
            assert all(t.numel() == 0 or lo <= t.data_ptr() < hi for t in leaf_tensors(model.single_transformer_blocks[i]))
    finally:
        placement.close()
    placement.close()  # twice is fine


def test_weights_replaced_after_placement_are_taken_into_the_stream():
    """What fuse_lora does to a bf16 base: new bytes for a streamed weight (same shape) reach the GPU."""
    model = tiny_flux(schemes=("bf16",))
    twin = tiny_flux(schemes=("bf16",))
    pipe = types.SimpleNamespace(transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe, single=(1, 2, 3, 4)), "cpu")
    try:
        with torch.no_grad():
            model(**flux_inputs())
            for m in (model, twin):
                w = m.single_transformer_blocks[3].proj_out.weight
                w.data = w.data * 2  # a new tensor, as peft's merge assigns
            assert same_bits(model(**flux_inputs())[0], twin(**flux_inputs())[0])
            assert same_bits(model(**flux_inputs())[0], twin(**flux_inputs())[0])  # and it stays
        assert placement.streamers["transformer.single_transformer_blocks"].stats()["refreshed"] == 1
        bad = model.single_transformer_blocks[2].proj_out.weight
        bad.data = bad.data[:, :8].clone()
        with pytest.raises(KreaLiteError, match="another dtype or shape"), torch.no_grad():
            model(**flux_inputs())
    finally:
        placement.close()


def _lora_state_dict(model, rank=4, seed=3) -> dict:
    """A diffusers-format LoRA on every attention and MLP linear of every block."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if ("transformer_blocks" in name) and type(m).__name__ in ("Linear", "Linear4bit") and (
                ".attn." in name or ".ff" in name or "proj_mlp" in name or "proj_out" in name):
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g).to(torch.bfloat16) * 0.1
            sd[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g).to(torch.bfloat16) * 0.1
    return sd


@pytest.mark.parametrize("schemes", [("bf16",), ("nf4", "bf16")])
def test_lora_on_a_placed_model_equals_lora_on_the_unplaced_one(schemes):
    placed, plain = tiny_flux(schemes=schemes), tiny_flux(schemes=schemes)
    sd = _lora_state_dict(plain)
    pipe = types.SimpleNamespace(transformer=placed)
    placement = apply_plan(pipe, streamed_plan(pipe, double=(1, 2, 3), single=(0, 1, 2, 3, 4)), "cpu")
    try:
        with torch.no_grad():
            base = placed(**flux_inputs())[0]
        for m in (placed, plain):
            m.load_lora_adapter(dict(sd), adapter_name="a", prefix=None)
        changed = sum(1 for n, _ in placed.named_modules() if n.endswith("lora_A.a"))
        assert changed == len(sd) // 2  # every block got its adapter, streamed or not
        with torch.no_grad():
            want = plain(**flux_inputs())[0]
            got = placed(**flux_inputs())[0]
            assert not same_bits(got, base)
            assert same_bits(got, want)
            for m in (placed, plain):
                m.set_adapters(["a"], weights=[0.5])
            assert same_bits(placed(**flux_inputs())[0], plain(**flux_inputs())[0])
            for m in (placed, plain):
                m.disable_lora()
            assert same_bits(placed(**flux_inputs())[0], base)
            for m in (placed, plain):
                m.enable_lora()
                m.delete_adapters("a")
            assert same_bits(placed(**flux_inputs())[0], base)
    finally:
        placement.close()


def test_adapters_loaded_before_placement_are_counted_resident_and_never_streamed():
    """A LoRA on some blocks only, loaded before placement: measure counts its factors apart from the blocks'
    bytes, the streamed blocks (some with, some without it) share one layout of base weights, and the
    output equals the unplaced model with the same LoRA."""
    placed, plain = tiny_flux(schemes=("nf4", "bf16")), tiny_flux(schemes=("nf4", "bf16"))
    before = measure(types.SimpleNamespace(transformer=placed))
    sd = {k: v for k, v in _lora_state_dict(plain).items() if "single_transformer_blocks.1." not in k}
    for m in (placed, plain):
        m.load_lora_adapter(dict(sd), adapter_name="a", prefix=None)
    pipe = types.SimpleNamespace(transformer=placed)
    sizes = measure(pipe)
    assert sizes.adapters == sum(nbytes([t]) for k, t in placed.named_parameters() if ".lora_" in k) > 0
    assert (sizes.transformer_blocks, sizes.single_transformer_blocks, sizes.transformer_rest) == (
        before.transformer_blocks, before.single_transformer_blocks, before.transformer_rest)
    assert sizes.transformer == before.transformer + sizes.adapters
    assert plan_for_budget(sizes, None).step_activation_bytes > plan_for_budget(before, None).step_activation_bytes
    placement = apply_plan(pipe, streamed_plan(pipe, single=(0, 1, 2, 3, 4)), "cpu")
    try:
        streamer = placement.streamers["transformer.single_transformer_blocks"]
        packed = {id(t) for ts in streamer.tensors for t in ts}
        assert not any(id(t) in packed for k, t in placed.named_parameters() if ".lora_" in k)
        with torch.no_grad():
            assert same_bits(placed(**flux_inputs())[0], plain(**flux_inputs())[0])
    finally:
        placement.close()


def test_out_of_order_call_reloads_and_stays_exact(flux):
    model, ref = flux
    pipe = types.SimpleNamespace(transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe, single=(1, 2, 3, 4)), "cpu")
    try:
        s = placement.streamers["transformer.single_transformer_blocks"]
        x = torch.randn(1, 24, 64, dtype=torch.bfloat16)
        temb = torch.randn(1, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            model.single_transformer_blocks[3](hidden_states=x[:, 8:], encoder_hidden_states=x[:, :8], temb=temb)
            assert s.stats()["misses"] == 1
            assert same_bits(model(**flux_inputs())[0], ref)
    finally:
        placement.close()


def test_shared_global_code_map_is_not_moved(flux):
    import bitsandbytes.functional as F

    model, ref = flux
    dynamic = F.name2qmap["dynamic"]
    ptr, values = dynamic.data_ptr(), dynamic.clone()
    pipe = types.SimpleNamespace(transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe, double=(1, 2, 3)), "cpu")
    placement.close()
    assert dynamic.data_ptr() == ptr and torch.equal(dynamic, values)


def test_block_with_different_layout_is_refused_and_nothing_changes():
    model = tiny_flux(layers=2, single_layers=3)
    blocks = model.single_transformer_blocks
    name = next(n for n, m in blocks[2].named_modules() if type(m).__name__ == "Linear4bit")
    blocks[2].set_submodule(name, quantize_linear(nn.Linear(64, 64).to(torch.bfloat16), "bf16"))  # wrong shape on purpose
    pipe = types.SimpleNamespace(transformer=model)
    originals = list(blocks)
    with pytest.raises(KreaLiteError, match="laid out differently"):
        apply_plan(pipe, streamed_plan(pipe, single=(0, 1, 2)), "cpu")
    assert list(blocks) == originals and not any(map(is_streamed, blocks))


def test_measure_counts_blocks_and_rest(flux):
    model, _ = flux
    t5 = tiny_t5()
    sizes = measure(types.SimpleNamespace(transformer=model, text_encoder_2=t5))
    assert isinstance(sizes, Sizes)
    assert len(set(sizes.transformer_blocks)) == 1 and len(set(sizes.single_transformer_blocks)) == 1
    assert sizes.transformer_rest > 0 and sizes.t5_rest > 0 and sizes.text_encoder == 0 and sizes.vae == 0
    assert len(sizes.t5_blocks) == 4 and sizes.t5_blocks[0] > sizes.t5_blocks[1]  # relative attention bias
    whole = nbytes(leaf_tensors(model))
    assert abs(sizes.transformer - whole) <= 256 * len(leaf_tensors(model))  # same bytes up to alignment
    bf16 = tiny_flux(schemes=("bf16",))
    assert measure(types.SimpleNamespace(transformer=bf16)).transformer_blocks[0] > sizes.transformer_blocks[0]


# --- T5 and the on-demand components ---------------------------------------------------------------


def test_streamed_t5_equals_resident_across_releases():
    t5 = tiny_t5()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = t5(ids).last_hidden_state
    pipe = types.SimpleNamespace(text_encoder_2=t5)
    placement = apply_plan(pipe, streamed_plan(pipe, t5=True), "cpu")
    try:
        s = placement.streamers["text_encoder_2"]
        assert not is_streamed(t5.encoder.block[0]) and all(map(is_streamed, t5.encoder.block[1:]))
        assert not s.slots  # slots exist only while T5 runs
        with torch.no_grad():
            for _ in range(2):
                assert same_bits(t5(ids).last_hidden_state, ref)
                assert placement.on_demand.loaded == "text_encoder_2"
                placement.on_demand.use("transformer")  # what the transformer's pre-hook does
                assert not s.slots and placement.on_demand.loaded is None
        assert s.stats()["misses"] == 0  # each run fills the freshly allocated slots before block 1 needs them
    finally:
        placement.close()
    with torch.no_grad():
        assert same_bits(t5(ids).last_hidden_state, ref)


def test_on_demand_components_take_turns():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16)).eval()
    vae = AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=4, norm_num_groups=32).eval()
    model, t5 = tiny_flux(layers=1, single_layers=2), tiny_t5()
    pipe = types.SimpleNamespace(transformer=model, text_encoder_2=t5, text_encoder=clip, vae=vae)
    plan = dataclasses.replace(streamed_plan(pipe, single=(1,), t5=True), clip_on_gpu=False, vae_on_gpu=False,
                               vae_tiled=True)
    with torch.no_grad():
        ref = model(**flux_inputs())[0]
    placement = apply_plan(pipe, plan, "cpu")
    seen, slots = [], []
    try:
        od = placement.on_demand
        streamer = placement.streamers["transformer.single_transformer_blocks"]
        assert od.yield_to == [streamer]
        ids = torch.randint(0, 64, (1, 8))
        with torch.no_grad():
            for _ in range(2):  # two prompts, in FluxPipeline's order
                clip(ids)
                seen.append(od.loaded)
                slots.append(len(streamer.slots))  # freed while an on-demand component runs
                t5(ids)
                seen.append(od.loaded)
                assert same_bits(model(**flux_inputs())[0], ref)  # slots taken again, the same output
                seen.append(od.loaded)
                slots.append(len(streamer.slots))
                vae.decode(torch.randn(1, 4, 8, 8))
                seen.append(od.loaded)
                slots.append(len(streamer.slots))
        assert seen == ["text_encoder", "text_encoder_2", None, "vae"] * 2
        assert slots == [0, 1, 0] * 2
        assert od.moves == 6 and vae.use_tiling
        assert placement.stats()["on_demand"]["moves"] == 6
    finally:
        placement.close()
    assert not vae.use_tiling and not placement._hooks


def test_tiling_engages_at_1024_for_the_flux_vae():
    """FLUX's VAE config has sample_size 1024, so diffusers' default tile never splits a 1024^2 image."""
    from diffusers import AutoencoderKL

    from krea_lite.placement import _enable_tiling

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=16, sample_size=1024,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    assert vae.tile_latent_min_size == 128  # 1024 px / 8: a 128x128 latent would not be tiled
    was = _enable_tiling(vae)
    assert vae.use_tiling and vae.tile_sample_min_size == 512 and vae.tile_latent_min_size == 64
    assert was == (False, 1024, 128)


def test_plan_for_another_model_is_refused(flux):
    model, _ = flux
    other = types.SimpleNamespace(transformer=tiny_flux(layers=1, single_layers=2))
    plan = streamed_plan(other, single=(1,))
    with pytest.raises(KreaLiteError, match="plan was made for a model"):
        apply_plan(types.SimpleNamespace(transformer=model), plan, "cpu")


def test_flux_pipeline_call_is_unchanged_by_the_placement(quantized):
    """A real FluxPipeline (the tiny synthetic, NF4) gives the same image with blocks streamed and CLIP, T5
    and the VAE moved in on demand; the pipeline is called exactly as without krea-lite."""
    import bitsandbytes as bnb

    from krea_lite.pipeline import load_pipeline

    pipe = load_pipeline(quantized("nf4"), device="cpu", verify="none")
    pipe.set_progress_bar_config(disable=True)
    for m in [*pipe.transformer.modules(), *pipe.text_encoder_2.modules()]:
        if isinstance(m, bnb.nn.Linear4bit):  # the same (non-AVX512) CPU kernel with and without streaming
            m.support_avx512bf16_for_cpu = False

    def image():
        return pipe("a red fox in snow", num_inference_steps=2, width=64, height=64, max_sequence_length=64,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images

    ref = image()
    plan = dataclasses.replace(streamed_plan(pipe, double=(0, 1), single=(0, 1), prefetch=1, t5=True),
                               clip_on_gpu=False, vae_on_gpu=False, vae_tiled=True)
    placement = apply_plan(pipe, plan, "cpu")
    try:
        assert (image() == ref).all()
        stats = placement.stats()
        # 1 slot; filled once more after the encode freed it (the transformer yields its slots to T5/CLIP)
        assert stats["transformer.transformer_blocks"]["copies"] == _expected_copies(2, 1, 2) + 1
        assert stats["on_demand"]["moves"] == 3 and stats["on_demand"]["on_gpu"] == "vae"
    finally:
        placement.close()
    assert (image() == ref).all()


def test_a_placed_pipeline_says_what_it_is(quantized):
    """diffusers sees a quantized, device-mapped pipeline: dtype casts, pipe.to() and the other offloading
    entry points are refused by diffusers itself; close() gives back an ordinary pipeline."""
    from krea_lite.pipeline import load_pipeline

    pipe = load_pipeline(quantized("nf4"), device="cpu", verify="none")
    assert pipe.transformer.is_quantized and pipe.text_encoder_2.is_loaded_in_4bit
    with pytest.raises(ValueError, match="dtype"):
        pipe.transformer.to(torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        pipe.text_encoder_2.to(torch.float16)
    keys = list(pipe.transformer.state_dict())
    placement = apply_plan(pipe, streamed_plan(pipe, double=(0, 1), single=(0, 1), t5=True), "cpu")
    with placement:
        assert list(pipe.transformer.state_dict()) == keys
        assert set(pipe.hf_device_map) == {"transformer", "text_encoder_2", "text_encoder", "vae"}
        for call in (lambda: pipe.to("cpu"), pipe.enable_model_cpu_offload, pipe.enable_sequential_cpu_offload):
            with pytest.raises(ValueError, match="device mapping"):
                call()
    assert placement.closed and pipe.hf_device_map is None and not any(
        map(is_streamed, [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]))


def test_compile_and_attention_backend_see_every_block():
    """compile_repeated_blocks compiles streamed blocks too (the streaming hook runs outside the graph:
    torch.compiler.disable), and the output stays exact; set_attention_backend reaches every block."""
    import torch._dynamo

    model, ref_model = tiny_flux(schemes=("bf16",)), tiny_flux(schemes=("bf16",))
    with torch.no_grad():
        ref = ref_model(**flux_inputs())[0]
    pipe = types.SimpleNamespace(transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe, double=(2, 3), single=(1, 2, 3, 4)), "cpu")
    try:
        model.set_attention_backend("native")
        torch._dynamo.reset()
        model.compile_repeated_blocks(backend="eager", dynamic=False)
        compiled = [b for b in [*model.transformer_blocks, *model.single_transformer_blocks]
                    if getattr(b, "_compiled_call_impl", None) is not None]
        assert len(compiled) == len(model.transformer_blocks) + len(model.single_transformer_blocks)
        with torch.no_grad():
            for _ in range(2):
                assert same_bits(model(**flux_inputs())[0], ref)
        assert placement.streamers["transformer.single_transformer_blocks"].stats()["misses"] == 0
    finally:
        placement.close()
        torch._dynamo.reset()
