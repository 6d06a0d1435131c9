"""resolve_source on a folder, a BFL single file and a (cached, offline) hub repo id, and the one-line
errors for broken inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from krea_lite.errors import KreaLiteError
from krea_lite.source import DEFAULT_REPO, resolve_source
from krea_lite.synthetic import SINGLE_FILE

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _link_tree(src, dst, skip=()):
    """A copy of `src` made of symlinks (cheap), without the relative paths in `skip`."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or any(rel.as_posix().startswith(s) for s in skip):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, dst / rel)
    return dst


def _tensors(source, component):
    return [(name, t.shape, t.dtype, t) for name, t in source.iter_tensors(component)]


def _assert_same(a, b):
    assert [x[:3] for x in a] == [y[:3] for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[3], y[3]), x[0]


def test_folder(tiny_source):
    src = resolve_source(str(tiny_source))
    assert (src.id, src.root, src.revision, src.transformer_file) == (str(tiny_source), tiny_source, None, None)
    assert src.config("transformer")["num_layers"] == 2
    assert [p.name for p in src.files("transformer")] == [
        "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    tensors = _tensors(src, "transformer")
    assert [t[0] for t in tensors] == src.tensor_names("transformer")
    expected = {**load_file(src.files("transformer")[0]), **load_file(src.files("transformer")[1])}
    assert {t[0] for t in tensors} == expected.keys()
    assert src.tensor_names("text_encoder")[0].startswith("text_model.")  # stored names, as in the real repo
    assert src.describe()["synthetic"]["seed"] == 0


def test_single_file_yields_the_folder_tensors(tiny_source):
    single = tiny_source / SINGLE_FILE
    src = resolve_source(str(single), base=str(tiny_source))
    assert src.transformer_file == single and src.root == tiny_source
    assert src.files("transformer") == [single]
    got = sorted(_tensors(src, "transformer"), key=lambda t: t[0])
    _assert_same(got, sorted(_tensors(resolve_source(str(tiny_source)), "transformer"), key=lambda t: t[0]))
    assert src.tensor_names("transformer") == [t[0] for t in _tensors(src, "transformer")]
    info = src.describe()["transformer_file"]
    assert info == {"name": SINGLE_FILE, "size": single.stat().st_size,
                    "sha256": hashlib.sha256(single.read_bytes()).hexdigest()}


def test_single_file_comfy_prefix_and_fp32(tiny_source, tmp_path):
    """A ComfyUI-style file (model.diffusion_model. prefix, extra VAE keys, fp32) reads the same."""
    state = {f"model.diffusion_model.{k}": v.float() for k, v in load_file(tiny_source / SINGLE_FILE).items()}
    state["vae.decoder.conv_in.weight"] = torch.zeros(4)
    save_file(state, tmp_path / "comfy.safetensors")
    got = _tensors(resolve_source(str(tmp_path / "comfy.safetensors"), base=str(tiny_source)), "transformer")
    want = _tensors(resolve_source(str(tiny_source / SINGLE_FILE), base=str(tiny_source)), "transformer")
    _assert_same(got, want)


@pytest.fixture
def hub_cache(tiny_source, tmp_path, monkeypatch):
    """An offline Hugging Face cache holding owner/flux at COMMIT (laid out like huggingface_hub's)."""
    import huggingface_hub.constants as constants

    repo = tmp_path / "hub" / "models--owner--flux"
    _link_tree(tiny_source, repo / "snapshots" / COMMIT, skip=(SINGLE_FILE,))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    # huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import: patch the constants it consults per call
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_repo_id_from_cache(hub_cache, tiny_source):
    src = resolve_source("owner/flux")
    assert (src.id, src.root, src.revision) == ("owner/flux", hub_cache, COMMIT)
    _assert_same(_tensors(src, "text_encoder_2"), _tensors(resolve_source(str(tiny_source)), "text_encoder_2"))
    single = resolve_source(str(tiny_source / SINGLE_FILE), base="owner/flux")
    assert single.root == hub_cache and single.revision == COMMIT
    with pytest.raises(KreaLiteError, match="owner/missing is not a folder here .no such path., and as a Hugging Face "
                                            "repo id it is not in the local Hugging Face cache and the hub cannot be "
                                            "reached; check the path or repo id, connect to download it, or pass a "
                                            "local diffusers folder"):
        resolve_source("owner/missing")


def test_single_file_base_needs_no_transformer_weights(hub_cache, tiny_source, tmp_path):
    for shard in (hub_cache / "transformer").glob("*.safetensors*"):
        shard.unlink()
    resolve_source(str(tiny_source / SINGLE_FILE), base="owner/flux")
    with pytest.raises(KreaLiteError, match="transformer has no diffusion_pytorch_model.safetensors"):
        resolve_source("owner/flux")


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "owner/flux is gated .* accept the licence at https://huggingface.co/owner/flux and run "
                       "`hf auth login` or set HF_TOKEN"),
    ("RepositoryNotFoundError", "owner/flux is not a folder here .* it was not found on the Hugging Face hub"),
    ("RevisionNotFoundError", "owner/flux has no revision 'v9'"),
])
def test_hub_errors(monkeypatch, error, message):
    import huggingface_hub
    import huggingface_hub.errors

    def fail(*args, **kwargs):
        raise getattr(huggingface_hub.errors, error)("hub says no", response=SimpleNamespace(
            headers={}, request=None, status_code=403))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(KreaLiteError, match=message):
        resolve_source("owner/flux", revision="v9")


def _broken(tiny_source, tmp_path, case):
    """(spec, base, text the error must contain) for one broken input."""
    if case == "missing path":
        return str(tmp_path / "nope"), None, f"{tmp_path / 'nope'} does not exist"
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty"), None, f"{tmp_path / 'empty'} is empty"
    if case == "no model_index":
        _link_tree(tiny_source, tmp_path / "f", skip=("model_index.json",))
        return str(tmp_path / "f"), None, f"{tmp_path / 'f'} has no model_index.json"
    if case == "not flux":
        _link_tree(tiny_source, tmp_path / "f", skip=("model_index.json",))
        (tmp_path / "f" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        return str(tmp_path / "f"), None, "'StableDiffusionPipeline', not a FluxPipeline"
    if case == "missing component":
        _link_tree(tiny_source, tmp_path / "f", skip=("vae",))
        return str(tmp_path / "f"), None, f"{tmp_path / 'f' / 'vae'} is missing"
    if case == "missing shard":
        _link_tree(tiny_source, tmp_path / "f", skip=("transformer/diffusion_pytorch_model-00002",))
        return str(tmp_path / "f"), None, "diffusion_pytorch_model-00002-of-00002.safetensors is missing"
    bad = tmp_path / "bad.safetensors"
    data = (tiny_source / SINGLE_FILE).read_bytes()
    if case == "truncated single file":
        bad.write_bytes(data[: len(data) // 2])
    elif case == "corrupt header":
        bad.write_bytes(data[:8] + b"#" * 16 + data[24:])
    elif case == "not a transformer":
        shutil.copyfile(tiny_source / "vae" / "diffusion_pytorch_model.safetensors", bad)
        return str(bad), str(tiny_source), f"{bad} is not a FLUX transformer single file"
    elif case == "single file as base":
        return str(tiny_source / SINGLE_FILE), str(tiny_source / SINGLE_FILE), "is a single file; pass a repo id"
    return str(bad), str(tiny_source), f"{bad} is truncated or not a safetensors file"


CASES = ["missing path", "empty folder", "no model_index", "not flux", "missing component", "missing shard",
         "truncated single file", "corrupt header", "not a transformer", "single file as base"]


@pytest.mark.parametrize("case", CASES)
def test_broken_inputs(tiny_source, tmp_path, case):
    spec, base, message = _broken(tiny_source, tmp_path, case)
    with pytest.raises(KreaLiteError) as e:
        resolve_source(spec, base=base)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_truncated_shard_fails_when_read(tiny_source, tmp_path):
    folder = _link_tree(tiny_source, tmp_path / "f", skip=("text_encoder_2/model-00001",))
    shard = folder / "text_encoder_2" / "model-00001-of-00001.safetensors"
    shard.write_bytes((tiny_source / "text_encoder_2" / shard.name).read_bytes()[:-10])
    src = resolve_source(str(folder))
    with pytest.raises(KreaLiteError, match=f"{shard} is truncated or not a safetensors file"):
        next(src.iter_tensors("text_encoder_2"))


def test_default_base_is_the_krea_repo():
    assert DEFAULT_REPO == "black-forest-labs/FLUX.1-Krea-dev"


def test_the_source_hash_gives_up_when_the_conversion_beside_it_failed(tmp_path):
    import threading

    from krea_lite.checkpoint import sha256_file

    f = tmp_path / "x.safetensors"
    f.write_bytes(b"a" * 100)
    stop = threading.Event()
    assert sha256_file(f, chunk=10, stop=stop) == hashlib.sha256(b"a" * 100).hexdigest()
    stop.set()
    assert sha256_file(f, chunk=10, stop=stop) is None
