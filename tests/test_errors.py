"""Bad input gives one clear line, exit code 2 and no traceback; source files are never touched.

Every case goes through `krea_lite.cli.main` where a user would meet it, and checks that stderr is
exactly one `krea-lite: error: ...` line naming the file or value. Cases on a source also check that
the source tree is byte-identical afterwards and that no output or temporary folder is left behind.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from krea_lite.checkpoint import MANIFEST, check_safetensors_header, weight_files
from krea_lite.cli import main
from krea_lite.errors import KreaLiteError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
SRC = Path(__file__).resolve().parent.parent / "src" / "krea_lite"


# ---------------------------------------------------------------------------------------------
# helpers


def tree_hash(folder: Path) -> dict[str, str]:
    """rel path -> sha256 of every file under `folder` (what "the source is unchanged" means)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error(capsys, *argv) -> str:
    """Run the CLI, expect a user error: exit 2 and exactly one `krea-lite: error:` line on stderr."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, f"exit {rc}, stderr: {err!r}"
    assert err.startswith("krea-lite: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".krea-tmp-" in p.name)


def quantize_refused(capsys, source, out, *extra) -> str:
    """`krea-lite quantize` fails with one line, leaves the source byte-identical and writes nothing."""
    source, out = Path(source), Path(out)
    tree = source if source.is_dir() else source.parent
    before = tree_hash(tree) if tree.is_dir() else None
    existed = out.exists()
    err = cli_error(capsys, "quantize", source, "--out", out, "--device", "cpu", "--quiet", *extra)
    if before is not None:
        assert tree_hash(tree) == before, "the source was modified"
    assert existed or not out.exists(), f"{out} was created"
    assert not leftovers(out.parent), leftovers(out.parent)
    return err


@pytest.fixture
def source_copy(tiny_source, tmp_path):
    """A private copy of the tiny source that a test may damage."""
    return Path(shutil.copytree(tiny_source, tmp_path / "flux-copy"))


@pytest.fixture
def folder_copy(quantized, tmp_path):
    """A private copy of the NF4 quantized folder that a test may damage."""
    return Path(shutil.copytree(quantized("nf4"), tmp_path / "krea-nf4"))


@pytest.fixture
def untouched(tiny_source):
    """Asserts after the test that the shared tiny source is byte-identical."""
    before = tree_hash(tiny_source)
    yield tiny_source
    assert tree_hash(tiny_source) == before, "the source was modified"


def _rewrite_tensor(path: Path, name: str | None, change) -> str:
    """Rewrite one tensor of a safetensors file with `change(tensor)`; returns its name."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    name = name or next(k for k in sorted(tensors) if k.endswith(".weight") and tensors[k].dim() == 2)
    tensors[name] = change(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})
    return name


# ---------------------------------------------------------------------------------------------
# the source: missing, empty, not FLUX, damaged files, wrong tensors


def test_source_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    err = quantize_refused(capsys, missing, tmp_path / "out")
    assert str(missing) in err


def test_source_is_empty_folder(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = quantize_refused(capsys, empty, tmp_path / "out")
    assert str(empty) in err


def test_source_is_not_a_flux_pipeline(capsys, tmp_path):
    other = tmp_path / "sdxl"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                        "unet": ["diffusers", "UNet2DConditionModel"]}))
    err = quantize_refused(capsys, other, tmp_path / "out")
    assert str(other) in err


def test_source_file_is_not_a_flux_transformer(capsys, untouched, tmp_path):
    from safetensors.torch import save_file

    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    err = quantize_refused(capsys, text, tmp_path / "out1", "--base", untouched)
    assert str(text) in err
    other = tmp_path / "lora.safetensors"
    save_file({"lora_A.weight": torch.zeros(4, 8), "lora_B.weight": torch.zeros(8, 4)}, other)
    err = quantize_refused(capsys, other, tmp_path / "out2", "--base", untouched)
    assert str(other) in err


def _transformer_file(source: Path) -> Path:
    return weight_files(source / "transformer")[0]


def test_source_safetensors_truncated(capsys, source_copy, tmp_path):
    path = _transformer_file(source_copy)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    err = quantize_refused(capsys, source_copy, tmp_path / "out")
    assert str(path) in err and "truncated" in err


def test_source_safetensors_corrupted_header(capsys, source_copy, tmp_path):
    path = _transformer_file(source_copy)
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbag"  # the JSON header now starts with a NUL byte
    path.write_bytes(bytes(data))
    err = quantize_refused(capsys, source_copy, tmp_path / "out")
    assert str(path) in err and "header" in err


def test_source_tensor_wrong_shape(capsys, source_copy, tmp_path):
    path = _transformer_file(source_copy)
    name = _rewrite_tensor(path, None, lambda t: t[:, :-1].contiguous())
    err = quantize_refused(capsys, source_copy, tmp_path / "out")
    assert repr(name) in err and "shape" in err and "expects" in err


def test_source_tensor_wrong_dtype(capsys, source_copy, tmp_path):
    path = _transformer_file(source_copy)
    name = _rewrite_tensor(path, None, lambda t: t.to(torch.int32))
    err = quantize_refused(capsys, source_copy, tmp_path / "out")
    assert repr(name) in err and "torch.int32" in err


def test_source_component_with_pickle_weights_only(capsys, source_copy, tmp_path):
    vae = source_copy / "vae"
    for p in weight_files(vae):
        p.rename(p.with_suffix(".bin"))  # what an old download holds: pickle, never loaded
    err = quantize_refused(capsys, source_copy, tmp_path / "out")
    assert str(vae) in err and "safetensors" in err


# ---------------------------------------------------------------------------------------------
# a hub repo id: offline, gated, private or unknown


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails, as on a machine without network."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_repo_id_offline_and_not_cached(capsys, tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    err = quantize_refused(capsys, "black-forest-labs/FLUX.1-Krea-dev", tmp_path / "out")
    assert "black-forest-labs/FLUX.1-Krea-dev is not a folder here" in err and "local Hugging Face cache" in err
    assert "local diffusers folder" in err
    assert not (tmp_path / "out").exists()


def test_single_file_with_default_base_offline(capsys, untouched, tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    err = quantize_refused(capsys, untouched / "flux1-krea-dev.safetensors", tmp_path / "out")
    assert "come from --base, by default black-forest-labs/FLUX.1-Krea-dev" in err
    assert "pass --base with a local diffusers folder" in err


def _hub_error(cls, status: int):
    from huggingface_hub import errors

    url = "https://huggingface.co/api/models/black-forest-labs/FLUX.1-Krea-dev"
    http = importlib.import_module(errors.Response.__module__.split(".")[0])  # httpx2/httpx, or requests
    if http.__name__ == "requests":
        response = http.Response()
        response.status_code, response.url = status, url
    else:
        response = http.Response(status, request=http.Request("GET", url))
    return cls(f"{status} error for {url}", response=response)


@pytest.mark.parametrize("error, expected", [
    (("GatedRepoError", 403), "is gated and this account has no access"),
    (("RepositoryNotFoundError", 404), "was not found on the Hugging Face hub"),
    (("HfHubHTTPError", 401), "the hub refused access (HTTP 401)"),
])
def test_repo_id_without_access(capsys, tmp_path, monkeypatch, error, expected):
    import huggingface_hub
    from huggingface_hub import errors

    exc = _hub_error(getattr(errors, error[0]), error[1])

    def download(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    err = quantize_refused(capsys, "black-forest-labs/FLUX.1-Krea-dev", tmp_path / "out")
    assert expected in err and "black-forest-labs/FLUX.1-Krea-dev" in err
    assert "hf auth login" in err or "HF_TOKEN" in err


# ---------------------------------------------------------------------------------------------
# --out and --force


def test_out_exists_needs_force(capsys, untouched, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = quantize_refused(capsys, untouched, out)
    assert str(out) in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("what", ["folder", "file"])
def test_force_replaces_only_krea_lite_folders(capsys, untouched, tmp_path, what):
    out = tmp_path / "mystuff"
    if what == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    err = quantize_refused(capsys, untouched, out, "--force")
    assert str(out) in err and "not a krea-lite folder" in err
    assert (out / "notes.txt" if what == "folder" else out).read_text() == "mine"


def test_force_replaces_an_earlier_output_and_an_empty_folder(untouched, quantized, tmp_path):
    earlier, empty = tmp_path / "earlier", tmp_path / "empty"
    shutil.copytree(quantized("nf4"), earlier)  # a krea-lite folder (it has a manifest): ours to replace
    (earlier / "stray.txt").write_text("gone with the folder")
    empty.mkdir()
    for out in (earlier, empty):
        assert main(["quantize", str(untouched), "--out", str(out), "--device", "cpu", "--quiet", "--force"]) == 0
        assert main(["verify", str(out)]) == 0 and not (out / "stray.txt").exists()


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_force_never_deletes_the_source(capsys, where, source_copy):
    out = {"same": source_copy, "parent": source_copy.parent, "inside": source_copy / "out"}[where]
    before = tree_hash(source_copy.parent)
    err = quantize_refused(capsys, source_copy, out, "--force")
    assert "overlaps the source" in err and str(source_copy) in err
    assert tree_hash(source_copy.parent) == before  # the folder around it too


def test_force_never_deletes_a_single_file_source(capsys, untouched, tmp_path):
    single = tmp_path / "flux1-krea-dev.safetensors"
    shutil.copyfile(untouched / "flux1-krea-dev.safetensors", single)
    err = quantize_refused(capsys, single, single, "--force", "--base", untouched)
    assert "overlaps the source" in err and single.is_file()


def test_force_never_deletes_the_base_of_a_single_file(capsys, source_copy, tmp_path):
    single = tmp_path / "flux1-krea-dev.safetensors"
    shutil.copyfile(source_copy / "flux1-krea-dev.safetensors", single)
    before = tree_hash(source_copy)
    err = quantize_refused(capsys, single, source_copy, "--force", "--base", source_copy)
    assert "overlaps the source" in err and str(source_copy) in err
    assert tree_hash(source_copy) == before


# ---------------------------------------------------------------------------------------------
# the quantized folder: tampered, incomplete, foreign manifests


def _edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_verify_ok(capsys, quantized):
    folder = quantized("nf4")
    assert main(["verify", str(folder)]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {folder}")


def test_folder_tampered_file(capsys, folder_copy):
    config = folder_copy / "vae" / "config.json"
    config.write_text(config.read_text().replace("{", "{\n  \"tampered\": 1,", 1))
    for argv in (["verify", folder_copy], ["verify", "--quick", folder_copy]):
        err = cli_error(capsys, *argv)
        assert str(config) in err and "bytes" in err and "re-create" in err
    with pytest.raises(KreaLiteError, match="vae/config.json"):
        from krea_lite.pipeline import load_pipeline

        load_pipeline(folder_copy, device="cpu")


def test_folder_truncated_and_corrupted_safetensors(capsys, folder_copy):
    path = weight_files(folder_copy / "transformer")[0]
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"\xff" * 8 + data[16:])  # same size, header no longer JSON
    err = cli_error(capsys, "verify", "--quick", folder_copy)
    assert str(path) in err and "corrupted safetensors header" in err
    with pytest.raises(KreaLiteError, match="truncated"):
        truncated = folder_copy / "cut.safetensors"
        truncated.write_bytes(data[:5])
        check_safetensors_header(truncated)
    path.write_bytes(data[:-100])
    err = cli_error(capsys, "verify", "--quick", folder_copy)
    assert str(path) in err and "the manifest says" in err


def test_folder_missing_component(capsys, folder_copy):
    shutil.rmtree(folder_copy / "vae")
    err = cli_error(capsys, "verify", folder_copy)
    assert str(folder_copy / "vae") in err and "component 'vae'" in err
    err = cli_error(capsys, "generate", "--model", folder_copy, "--device", "cpu", "a fox")
    assert "component 'vae'" in err


def test_folder_missing_file(capsys, folder_copy):
    missing = weight_files(folder_copy / "text_encoder_2")[0]
    missing.unlink()
    err = cli_error(capsys, "generate", "--model", folder_copy, "--device", "cpu", "a fox")
    assert err == f"krea-lite: error: {missing} is missing (listed in {MANIFEST}); re-create the folder"


def test_manifest_missing_a_component_entry(capsys, folder_copy):
    _edit_manifest(folder_copy, lambda m: m["components"].pop("text_encoder_2"))
    err = cli_error(capsys, "verify", "--quick", folder_copy)
    assert "'text_encoder_2'" in err and "model_index.json" in err


def test_manifest_newer_format_version(capsys, folder_copy):
    _edit_manifest(folder_copy, lambda m: m.update(format_version=99))
    err = cli_error(capsys, "verify", folder_copy)
    assert str(folder_copy / MANIFEST) in err and "99" in err and "update krea-lite" in err
    assert "pip install" not in err  # the package may not be on a package index


@pytest.mark.parametrize("version", [0, -1, "1", None, 1.5, True])
def test_manifest_unknown_format_version(capsys, folder_copy, version):
    _edit_manifest(folder_copy, lambda m: m.update(format_version=version))
    err = cli_error(capsys, "verify", "--quick", folder_copy)
    assert "unknown format_version" in err and repr(version) in err


def test_manifest_not_krea_lite(capsys, folder_copy):
    (folder_copy / MANIFEST).write_text("{ not json")
    assert "is not valid JSON" in cli_error(capsys, "verify", folder_copy)
    (folder_copy / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    assert "is not a krea-lite manifest" in cli_error(capsys, "verify", folder_copy)
    (folder_copy / MANIFEST).unlink()
    err = cli_error(capsys, "verify", folder_copy)
    assert str(folder_copy) in err and "has no krea_lite.json" in err


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/passwd", "vae/../../outside.txt"])
def test_manifest_path_outside_the_folder(capsys, folder_copy, rel):
    (folder_copy.parent / "outside.txt").write_text("x")
    _edit_manifest(folder_copy, lambda m: m["files"].update({rel: {"size": 1, "sha256": "0" * 64}}))
    err = cli_error(capsys, "verify", "--quick", folder_copy)
    assert repr(rel) in err and "outside the folder" in err


def test_manifest_symlink_out_of_the_folder(capsys, folder_copy):
    (folder_copy.parent / "outside.txt").write_text("x")
    (folder_copy / "vae" / "link.txt").symlink_to(folder_copy.parent / "outside.txt")
    _edit_manifest(folder_copy, lambda m: m["files"].update({"vae/link.txt": {"size": 1, "sha256": "0" * 64}}))
    err = cli_error(capsys, "verify", folder_copy)
    assert f"{folder_copy / 'vae' / 'link.txt'} is a symbolic link to {folder_copy.parent / 'outside.txt'}" in err
    assert "replace the link with a copy" in err and "names" not in err  # the link is blamed, not the manifest


def test_manifest_entry_without_hash(capsys, folder_copy):
    _edit_manifest(folder_copy, lambda m: m["files"]["vae/config.json"].pop("sha256"))
    err = cli_error(capsys, "verify", folder_copy)
    assert "'vae/config.json'" in err and "sha256" in err


def test_config_inconsistent_with_scheme(capsys, folder_copy):
    _edit_manifest(folder_copy, lambda m: m["components"]["transformer"].update(scheme="qint8",
                                                                                 backend="optimum-quanto"))
    err = cli_error(capsys, "verify", "--quick", folder_copy)
    assert str(folder_copy / "transformer" / "config.json") in err and "'qint8'" in err


def test_model_is_not_a_folder(capsys, tmp_path):
    err = cli_error(capsys, "generate", "--model", tmp_path / "nope", "--device", "cpu", "a fox")
    assert str(tmp_path / "nope") in err and "is not a folder" in err


# ---------------------------------------------------------------------------------------------
# generation values (checked before anything loads)


@pytest.mark.parametrize("flags, named", [
    (["--steps", "0"], "--steps 0"),
    (["--steps", "-3"], "--steps -3"),
    (["--width", "1000"], "--width 1000"),
    (["--height", "0"], "--height 0"),
    (["--width", "-16"], "--width -16"),
    (["--guidance", "nan"], "--guidance nan"),
    (["--guidance", "inf"], "--guidance inf"),
    (["--num-images", "0"], "--num-images 0"),
])
def test_bad_generation_values(capsys, tmp_path, flags, named):
    err = cli_error(capsys, "generate", "--model", tmp_path / "never-loaded", "--device", "cpu", "a fox", *flags)
    assert named in err


@pytest.mark.parametrize("under", ["", "sub"])
def test_out_is_a_file(capsys, tmp_path, under):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / under if under else tmp_path / "notes.txt"
    err = cli_error(capsys, "generate", "--model", tmp_path / "never-loaded", "--device", "cpu", "a fox",
                    "--out", out)
    assert f"{tmp_path / 'notes.txt'} is a file" in err and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(capsys, tmp_path, prompt):
    err = cli_error(capsys, "generate", "--model", tmp_path, "--device", "cpu", prompt)
    assert "prompt is empty" in err


def test_no_prompt(capsys, tmp_path):
    assert "give a prompt" in cli_error(capsys, "generate", "--model", tmp_path, "--device", "cpu")


def test_prompt_file_not_utf8(capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("un renard roux\n".encode("utf-16"))
    before = path.read_bytes()
    err = cli_error(capsys, "generate", "--model", tmp_path, "--prompts", path)
    assert str(path) in err and "not UTF-8" in err
    assert path.read_bytes() == before


def test_prompt_file_missing_or_blank(capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    assert "does not exist" in cli_error(capsys, "generate", "--model", tmp_path, "--prompts", path)
    path.write_text("\n  \n")
    assert "holds no prompt" in cli_error(capsys, "generate", "--model", tmp_path, "--prompts", path)


def test_generate_config_direct():
    from krea_lite.generate import GenerateConfig

    for bad in (dict(steps=0), dict(width=17), dict(height=1.5), dict(guidance=math.nan), dict(guidance=-math.inf)):
        with pytest.raises(KreaLiteError):
            GenerateConfig(**bad)


# ---------------------------------------------------------------------------------------------
# the machine: CUDA, device names, VRAM budget, disk


@no_cuda
def test_cuda_absent_load_pipeline(quantized):
    from krea_lite.pipeline import load_pipeline

    with pytest.raises(KreaLiteError, match="no CUDA GPU; use --device cpu"):
        load_pipeline(quantized("nf4"), device="cuda")


@no_cuda
def test_cuda_absent_cli(capsys, quantized, untouched, tmp_path):
    err = cli_error(capsys, "generate", "--model", quantized("nf4"), "--device", "cuda", "a fox")
    assert "'cuda'" in err and "--device cpu" in err
    err = quantize_refused(capsys, untouched, tmp_path / "out", "--device", "cuda")
    assert "'cuda'" in err and "--device cpu" in err


@no_cuda
def test_cuda_absent_is_refused_before_any_download(capsys, tmp_path, monkeypatch):
    import huggingface_hub

    def download(*args, **kwargs):
        raise AssertionError("downloaded before checking the device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    err = quantize_refused(capsys, "black-forest-labs/FLUX.1-Krea-dev", tmp_path / "out", "--device", "cuda")
    assert "no CUDA GPU" in err


def test_unknown_device(capsys, quantized):
    err = cli_error(capsys, "generate", "--model", quantized("nf4"), "--device", "tpu", "a fox")
    assert "'tpu'" in err


def test_vram_budget_too_small_says_what_is_needed(capsys, quantized):
    from krea_lite.pipeline import load_pipeline
    from krea_lite.plan import measure, plan_for_budget

    folder = quantized("nf4")
    sizes = measure(load_pipeline(folder, device="cpu", verify="none"))
    with pytest.raises(KreaLiteError, match=r"0\.10 GiB \(what torch may allocate, CUDA context excluded\) is too small for 1024x1024, batch 1: .* needs \d+\.\d+ GiB"):
        plan_for_budget(sizes, int(0.1 * 2**30), width=1024, height=1024, batch=1)
    capsys.readouterr()
    err = cli_error(capsys, "plan", "--model", folder, "--vram-gb", "0.9")  # 0.05 GiB after the CUDA context
    suggested = re.search(r"give at least --vram-gb (\d+\.\d)", err)
    assert suggested, err
    assert main(["plan", "--model", str(folder), "--vram-gb", suggested.group(1)]) == 0  # the advice works
    capsys.readouterr()
    assert "leaves nothing for the model" in cli_error(capsys, "plan", "--model", folder, "--vram-gb", "0")


def test_disk_too_small_before_starting(capsys, untouched, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    err = quantize_refused(capsys, untouched, tmp_path / "out")
    assert str(tmp_path) in err and re.search(r"has 0.0 MiB free; the conversion needs about \d+\.\d MiB", err)
    assert "free some space or choose another --out" in err


def test_disk_full_during_conversion(capsys, untouched, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    err = quantize_refused(capsys, untouched, out)
    assert err == f"krea-lite: error: disk full while writing {out}: nothing was kept; free space and run again"


def test_disk_full_while_copying(capsys, untouched, tmp_path, monkeypatch):
    from krea_lite import quantize

    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(quantize.shutil, "copyfile", full)
    err = quantize_refused(capsys, untouched, tmp_path / "out")
    assert "disk full" in err


def test_interrupted_conversion_keeps_nothing(capsys, untouched, tmp_path, monkeypatch):
    import safetensors.torch

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", ctrl_c)
    out = tmp_path / "out"
    assert main(["quantize", str(untouched), "--out", str(out), "--device", "cpu", "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == "krea-lite: interrupted"
    assert not out.exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# no traceback unless --debug; safe loading only


def test_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(KreaLiteError, match="is not a folder"):
        main(["--debug", "verify", str(tmp_path / "nope")])


def test_unexpected_error_is_one_line_without_debug(capsys, tmp_path, monkeypatch):
    from krea_lite import checkpoint

    def boom(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(checkpoint, "verify_checkpoint", boom)
    assert main(["verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("krea-lite: unexpected ValueError: boom") and "--debug" in err and "\n" not in err


def test_no_unsafe_loading_in_the_package():
    """Weights come from safetensors: no pickle, no remote code, torch.load only with weights_only=True."""
    for path in sorted(SRC.glob("*.py")):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path.name
        assert not re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M), path.name
        assert "use_safetensors=False" not in text, path.name


def test_generate_downloads_nothing(quantized, tmp_path, monkeypatch):
    """load_pipeline + generate with every socket refused: nothing is fetched at generate time."""
    import socket

    from krea_lite.generate import GenerateConfig, generate
    from krea_lite.pipeline import load_pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("krea-lite tried to open a network connection at generate time")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(quantized("nf4"), device="cpu", verify="full")
    pipe.set_progress_bar_config(disable=True)
    (g,) = generate(pipe, ["a fox"], GenerateConfig(steps=1, width=32, height=32), tmp_path)
    assert g.path.exists()
