"""write_synthetic: a FLUX.1 Krea [dev] look-alike with random weights, laid out like the real repo.

Same files as black-forest-labs/FLUX.1-Krea-dev (model_index.json, the seven component folders,
sharded safetensors with their index, and the BFL single file flux1-krea-dev.safetensors), same
architecture; "full" has the real sizes, "tiny" shrinks every width so the whole pipeline runs on a
CPU. Weights are made tensor by tensor from (seed, component, name), each with its own CPU
generator, so a seed always gives the same bytes and host RAM stays around one shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from .checkpoint import check_out_parent, os_error, out_lock, save_safetensors
from .errors import KreaLiteError
from .source import SYNTHETIC_MARKER, bfl_layout, diffusers_to_bfl, open_safetensors

SIZES = ("tiny", "full")
SINGLE_FILE = "flux1-krea-dev.safetensors"
SHARD_BYTES = {"tiny": 8 << 20, "full": 5 * 10**9}  # tiny: the transformer still spans 2 shards
# Sampling one tensor is serial (~4.4 s per GB of bf16 on one core), so tensors are made in parallel,
# one per core, with torch's intra-op threads set to 1 meanwhile (no oversubscription).
WORKERS = min(16, os.cpu_count() or 1)
SHARDED = ("transformer", "text_encoder_2")  # written with an index even as one shard, like the real repo
# transformers 5 builds CLIPTextModel without its `text_model.` module, but the real checkpoint
# (and save_pretrained after from_pretrained) keeps the prefix; transformers maps it on load.
FILE_PREFIX = {"text_encoder": "text_model."}

# The real configs (black-forest-labs/FLUX.1-Krea-dev, <component>/config.json).
FULL = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True, use_quant_conv=False,
                use_post_quant_conv=False, mid_block_add_attention=True),
    # bos/eos/pad 0/2/1 as in the real file: eos_token_id == 2 makes CLIPTextTransformer pool at the
    # argmax token id, which is <|endoftext|> for the real tokenizer and for ours (it is the last id).
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
    "text_encoder_2": dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                           num_decoder_layers=24, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                           relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.1,
                           tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
}
# Tiny: same structure, widths that are multiples of 128 (NF4 blocks of 64, quanto int4 groups of
# 128 along in_features), 2 double + 2 single blocks so block streaming has something to stream.
TINY = {
    "transformer": {**FULL["transformer"], "num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2,
                    "joint_attention_dim": 128, "pooled_projection_dim": 128},  # inner 2 x 128 = 256
    "vae": {**FULL["vae"], "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8,
            "sample_size": 128},  # 4 levels: vae_scale_factor stays 8
    # vocab and special ids come from the tiny tokenizer (see _clip_vocab)
    "text_encoder": {**FULL["text_encoder"], "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "projection_dim": 128},
    # tokenizer has 202 ids; padded to 256 like the real 32100 -> 32128
    "text_encoder_2": {**FULL["text_encoder_2"], "vocab_size": 256, "d_model": 128, "d_ff": 256, "num_heads": 2,
                       "num_layers": 2, "num_decoder_layers": 2},
}
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
PIPELINE_COMPONENTS = {  # model_index.json, after _class_name and _diffusers_version
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
WEIGHT_PREFIX = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                 "text_encoder": "model", "text_encoder_2": "model"}


# --------------------------------------------------------------------------------------------- models


def _configs(size: str) -> dict[str, dict]:
    cfg = {k: dict(v) for k, v in (FULL if size == "full" else TINY).items()}
    if size == "tiny":
        vocab = _clip_vocab()
        end = vocab["<|endoftext|>"]
        cfg["text_encoder"].update(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=end,
                                   pad_token_id=end)
    return cfg


def _text_config(component: str, cfg: dict):
    """A fresh transformers config (T5EncoderModel edits the one it is given: is_encoder_decoder)."""
    import transformers

    if component == "text_encoder":
        return transformers.CLIPTextConfig(**cfg, architectures=["CLIPTextModel"], dtype="bfloat16")
    return transformers.T5Config(**cfg, architectures=["T5EncoderModel"], dtype="bfloat16")


def _meta_model(component: str, cfg: dict) -> nn.Module:
    """The component built on the meta device (names and shapes, no memory)."""
    import diffusers
    import transformers

    with torch.device("meta"):
        if component == "transformer":
            return diffusers.FluxTransformer2DModel.from_config(cfg)
        if component == "vae":
            return diffusers.AutoencoderKL.from_config(cfg)
        cls = transformers.CLIPTextModel if component == "text_encoder" else transformers.T5EncoderModel
        return cls(_text_config(component, cfg))


def _specs(model: nn.Module, prefix: str = "") -> list[tuple[str, tuple[int, ...], str]]:
    """(stored name, shape, init kind) of every tensor to write; tied aliases once, no buffers."""
    specs = []
    for name, p in model.named_parameters():  # remove_duplicate: T5's embed_tokens is stored as shared
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, nn.Embedding):
            kind = "embedding"
        elif p.dim() >= 2:
            kind = "matrix"
        else:
            kind = "bias" if name.endswith("bias") else "norm"
        specs.append((prefix + name, tuple(p.shape), kind))
    return specs


def _tensor_seed(seed: int, component: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _random(seed: int, component: str, name: str, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """One tensor, a pure function of its arguments. Scales keep activations O(1) at full size."""
    g = torch.Generator().manual_seed(_tensor_seed(seed, component, name))
    t = torch.randn(shape, generator=g)  # float32, scaled, then rounded to bf16 once
    if kind == "matrix":  # Linear / Conv: std 1/sqrt(fan_in) preserves the activation scale
        t.mul_(1 / math.sqrt(math.prod(shape[1:])))
    elif kind == "norm":  # LayerNorm / RMSNorm / GroupNorm scale: 1 +- 0.02 (not exactly 1, so layouts show)
        t.mul_(0.02).add_(1.0)
    elif kind == "bias":
        t.mul_(0.02)
    # "embedding": N(0, 1), torch's nn.Embedding default
    return t.to(torch.bfloat16)


def _write_component(folder: Path, component: str, model: nn.Module, seed: int, shard_bytes: int,
                     pool: ThreadPoolExecutor, bar) -> None:
    """Weights of one component: shards of about `shard_bytes`, one shard in RAM at a time."""
    specs = _specs(model, FILE_PREFIX.get(component, ""))
    shards, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    prefix = WEIGHT_PREFIX[component]
    if component in SHARDED:
        names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    elif len(shards) == 1:
        names = [f"{prefix}.safetensors"]
    else:
        raise AssertionError(f"{component} needs {len(shards)} shards but is written unsharded")
    for name, shard in zip(names, shards, strict=True):
        state = {}
        for spec, tensor in zip(shard, pool.map(lambda s: _random(seed, component, *s), shard), strict=True):
            state[spec[0]] = tensor
            bar.update(tensor.numel() * 2)  # per tensor: a full-size shard takes minutes to make
        save_safetensors(state, folder / name, metadata={"format": "pt"})
        del state
    if component in SHARDED:
        index = {
            "metadata": {"total_size": sum(math.prod(s[1]) * 2 for s in specs)},
            "weight_map": {s[0]: name for name, shard in zip(names, shards, strict=True) for s in shard},
        }
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_single_file(path: Path, transformer: Path, cfg: dict, metadata: dict[str, str], bar) -> None:
    """The BFL single file, converted from the diffusers shards one BFL tensor at a time.

    Written by hand in the safetensors format (8-byte header length, JSON header, raw data) so
    that the 24 GB file streams: `save_file` would need every tensor in RAM at once.
    """
    index = json.loads((transformer / "diffusion_pytorch_model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    layout = bfl_layout(cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"])
    with ExitStack() as stack:
        handles = {n: stack.enter_context(open_safetensors(transformer / n)) for n in set(weight_map.values())}

        def shape(name: str) -> list[int]:
            return handles[weight_map[name]].get_slice(name).get_shape()

        header: dict = {"__metadata__": metadata}
        offset = 0
        for key in sorted(layout):
            dims = [shape(p) for p in layout[key]]
            full = [sum(d[0] for d in dims), *dims[0][1:]]
            nbytes = math.prod(full) * 2
            header[key] = {"dtype": "BF16", "shape": full, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for key in sorted(layout):
                t = diffusers_to_bfl(key, [handles[weight_map[p]].get_tensor(p) for p in layout[key]])
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                bar.update(t.numel() * 2)


# ----------------------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values, in CLIP's vocab order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]


# a few merges so the BPE path is exercised ("the" is one token); vocab ids follow CLIP's order
CLIP_MERGES = (("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("e", "r</w>"), ("o", "n</w>"))


def _clip_vocab() -> dict[str, int]:
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in CLIP_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last, as in CLIP: <|endoftext|> has the highest id
    return {t: i for i, t in enumerate(tokens)}


def _write_clip_tokenizer(folder: Path) -> None:
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(_clip_vocab(), ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        **special, "add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
        "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})


def _write_t5_tokenizer(folder: Path) -> None:
    """A Unigram tokenizer.json like T5's: <pad>=0, </s>=1, <unk>=2, Metaspace, '</s>' appended."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    extra = [f"<extra_id_{i}>" for i in range(100)]  # T5's sentinels, last ids, <extra_id_0> highest
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"]
    pieces += [("▁" + c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz"]  # word-initial letters
    pieces += [(e, 0.0) for e in reversed(extra)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<pad>", "</s>", "<unk>", *extra]])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        **special, "clean_up_tokenization_spaces": True, "extra_ids": 100, "legacy": True,
        "model_max_length": 512, "tokenizer_class": "T5Tokenizer"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ main


def write_synthetic(out: Path, size: str = "tiny", seed: int = 0, single_file: bool = True,
                    force: bool = False, gguf: tuple[str, ...] = ()) -> Path:
    """Write a random-weights FLUX.1 Krea [dev] pipeline folder laid out like the real hub repo.

    Args:
        out: the folder to create; it appears only when complete (written to a temporary sibling,
            then renamed).
        size: "tiny" (same architecture, tiny widths: a CPU generates 64x64 in well under a
            second per step) or "full" (the real configs: 11.9 B transformer, T5-XXL; ~33 GB, plus
            ~24 GB for the single file).
        seed: the weights are a pure function of (seed, component, tensor name).
        single_file: also write flux1-krea-dev.safetensors (BFL names) at the root.
        force: replace an existing `out`.
        gguf: also write the transformer as FLUX GGUFs of these GGML types (`synthetic_gguf.write_gguf`),
            `flux1-krea-dev-<TYPE>.gguf` at the root.

    Returns:
        `out`.
    """
    if size not in SIZES:
        raise KreaLiteError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    if gguf:
        from .gguf_file import qtype

        for kind in gguf:
            qtype(kind)  # an unknown type fails before anything is written
    out = Path(out).expanduser().resolve()
    check_out_parent(out, option="folder")
    with out_lock(out, option="folder"):  # one run per folder: a second one would delete this one's files
        try:
            return _write_locked(out, size, seed, single_file, force, tuple(gguf))
        except OSError as e:
            if (line := os_error(e, out, option="folder")) is not None:
                raise line from e
            raise


def _write_locked(out: Path, size: str, seed: int, single_file: bool, force: bool, gguf: tuple[str, ...]) -> Path:
    import diffusers

    from .progress import progress_bar

    if out.exists() and not force:
        raise KreaLiteError(f"{out} already exists; pass --force to replace it or choose another folder")
    if out.exists() and not (out / SYNTHETIC_MARKER).is_file():
        raise KreaLiteError(f"{out} exists and is not a synthetic model folder (no {SYNTHETIC_MARKER}); "
                            "--force only replaces those: remove it yourself or choose another folder")
    cfg = _configs(size)
    models = {c: _meta_model(c, cfg[c]) for c in WEIGHT_PREFIX}
    nbytes = {c: sum(math.prod(s[1]) * 2 for s in _specs(m)) for c, m in models.items()}
    total = sum(nbytes.values()) + (nbytes["transformer"] if single_file else 0) + len(gguf) * nbytes["transformer"]
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total * 1.02:
        raise KreaLiteError(f"{out.parent} has {free / 2**30:.1f} GiB free; a {size} synthetic model needs "
                            f"{total / 2**30:.1f} GiB{' (single file included)' if single_file else ''}: "
                            "free some space or choose another folder")

    for stale in out.parent.glob(f".{out.name}.synthetic-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.synthetic-tmp-{os.getpid()}"
    tmp.mkdir()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with ThreadPoolExecutor(WORKERS) as pool, \
                progress_bar(total=total, unit="B", unit_scale=True, desc=f"synthetic {size}",
                             disable=size != "full") as bar:  # shown in logs too: full takes minutes
            for component, model in models.items():
                folder = tmp / component
                folder.mkdir()
                if component in ("transformer", "vae"):
                    model.save_config(folder)
                else:
                    _text_config(component, cfg[component]).save_pretrained(folder)
                _write_component(folder, component, model, seed, SHARD_BYTES[size], pool, bar)
            if single_file:
                meta = {"format": "pt", "krea_lite_synthetic": f"random weights, size {size}, seed {seed}"}
                _write_single_file(tmp / SINGLE_FILE, tmp / "transformer", cfg["transformer"], meta, bar)
            for kind in gguf:
                from .synthetic_gguf import gguf_name, write_gguf

                write_gguf(tmp, tmp / gguf_name(kind), kind, seed=seed)
        _write_clip_tokenizer(tmp / "tokenizer")
        _write_t5_tokenizer(tmp / "tokenizer_2")
        diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_config(tmp / "scheduler")
        _write_json(tmp / "model_index.json", {"_class_name": "FluxPipeline",
                                               "_diffusers_version": diffusers.__version__, **PIPELINE_COMPONENTS})
        _write_json(tmp / SYNTHETIC_MARKER, {"generator": "krea-lite", "size": size, "seed": seed,
                                             "note": "random weights with the FLUX.1 Krea [dev] architecture"})
        old = out.parent / f".{out.name}.synthetic-old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return out
