"""What a new user hit with files (issue #10, items 1, 2, 4, 5, 6), end to end through the CLI.

Written files get a normal file's permissions; one quantize run per --out at a time; `verify` checks
what loading relies on and lists every problem; errors name what the user typed; read-only, full or
file-shadowed output locations are one line and exit code 2, with nothing left behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from krea_lite.checkpoint import MANIFEST, read_tensors
from krea_lite.cli import main

from .test_errors import cli_error, quantize_refused, tree_hash
from .test_faults import SRC_ROOT

LOCK = ".krea-lite-lock"


def _quantize(source, out, *extra) -> list:
    return ["quantize", str(source), "--out", str(out), "--device", "cpu", "--quiet", *map(str, extra)]


def _generate(model, out) -> list:
    return ["generate", "--model", str(model), "--device", "cpu", "--steps", "1", "--width", "64", "--height", "64",
            "--quiet", "--out", str(out), "a fox"]


def _edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _errors(capsys) -> list[str]:
    """Every stderr line, each a `krea-lite: error:` line without a traceback."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("krea-lite: error: ") for line in lines), lines
    return lines


def _nothing_left(parent: Path) -> None:
    left = sorted(p.name for p in parent.iterdir() if ".krea-tmp-" in p.name or ".synthetic-" in p.name
                  or p.name.endswith(LOCK))
    assert not left, left


@pytest.fixture
def untouched(tiny_source):
    """Asserts after the test that the shared tiny source is byte-identical."""
    before = tree_hash(tiny_source)
    yield tiny_source
    assert tree_hash(tiny_source) == before, "the source was modified"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, an empty Hugging Face cache, HF_HUB_OFFLINE."""
    import socket

    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def folder_copy(quantized, tmp_path):
    return Path(shutil.copytree(quantized("nf4"), tmp_path / "krea-nf4"))


# ---------------------------------------------------------------------------------------------
# 1. permissions: every written file gets 0666 & ~umask, as open() would give it


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_synth_and_quantize_write_files_with_the_umask_permissions(capsys, tmp_path, umask_027):
    src, out = tmp_path / "src", tmp_path / "q"
    assert main(["synth", str(src), "--size", "tiny"]) == 0
    assert main(_quantize(src, out, "--transformer", "qint8")) == 0
    capsys.readouterr()
    for folder in (src, out):
        modes = _modes(folder)
        assert any(rel.endswith(".safetensors") for rel in modes)
        wrong = {rel: oct(m) for rel, m in modes.items() if m != umask_027}
        assert not wrong, f"not {oct(umask_027)}: {wrong}"


# ---------------------------------------------------------------------------------------------
# 2. one quantize run per --out


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding the --out lock, as a running conversion does; it prints 'locked'."""
    code = ("import sys; from pathlib import Path; from krea_lite.checkpoint import out_lock\n"
            f"with out_lock(Path({str(out)!r})):\n    print('locked', flush=True); sys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": str(SRC_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_quantize_to_the_same_out_fails_while_the_first_runs(capsys, tiny_source, tmp_path):
    out = tmp_path / "krea-nf4"
    holder = _hold_lock(out)
    try:
        # the first run's half-written folder: a second run must neither publish nor remove it
        work = tmp_path / f".{out.name}.krea-tmp-{holder.pid}"
        work.mkdir()
        (work / "shard").write_bytes(b"first run")
        for extra in ((), ("--force",)):
            err = cli_error(capsys, *_quantize(tiny_source, out, *extra))
            assert err == (f"krea-lite: error: another krea-lite run (pid {holder.pid}) is writing {out} right now; "
                           "wait for it to finish or choose another --out")
            assert not out.exists() and (work / "shard").read_bytes() == b"first run"
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (tmp_path / f".{out.name}{LOCK}").exists()  # removed afterwards
    shutil.rmtree(work)


def test_lock_of_a_killed_run_does_not_block(capsys, tiny_source, tmp_path):
    out = tmp_path / "krea-nf4"
    holder = _hold_lock(out)
    holder.kill()
    holder.wait()
    assert (tmp_path / f".{out.name}{LOCK}").exists()  # left behind by the killed process
    assert main(_quantize(tiny_source, out)) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_two_quantize_processes_at_once_one_wins(tiny_source, tmp_path):
    """A real first run, paused inside its conversion (after the lock, before its first shard), and a
    real second run to the same --out meanwhile: the second fails in one line, the first finishes."""
    out, go = tmp_path / "krea-nf4", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(SRC_ROOT)}
    first_code = ("import sys, time; from pathlib import Path; import krea_lite.quantize as q; from krea_lite.cli import main\n"
                  "real = q.ShardWriter.add\n"
                  "def add(self, *a):\n"
                  "    print('converting', flush=True)\n"
                  f"    while not Path({str(go)!r}).exists(): time.sleep(0.02)\n"
                  "    return real(self, *a)\n"
                  "q.ShardWriter.add = add\n"
                  f"sys.exit(main({_quantize(tiny_source, out, '--force')!r}))\n")
    first = subprocess.Popen([sys.executable, "-c", first_code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert first.stdout.readline().strip() == "converting", first.stderr.read()
        second = subprocess.run([sys.executable, "-m", "krea_lite.cli", *_quantize(tiny_source, out, "--force")],
                                capture_output=True, text=True, env=env, timeout=300)
    finally:
        go.touch()
        out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0 and "wrote" in out1, err1
    assert second.returncode == 2 and second.stdout == "", second.stdout
    assert second.stderr.strip().splitlines() == [
        f"krea-lite: error: another krea-lite run (pid {first.pid}) is writing {out} right now; wait for it to "
        "finish or choose another --out"], second.stderr
    go.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert main(["verify", str(out)]) == 0


# ---------------------------------------------------------------------------------------------
# 4. verify and loading agree


def test_stray_safetensors_is_not_loaded(capsys, folder_copy, tmp_path):
    stray = folder_copy / "transformer" / "extra.safetensors"
    shutil.copyfile(folder_copy / "vae" / "diffusion_pytorch_model.safetensors", stray)
    assert main(["verify", str(folder_copy)]) == 0
    assert main(_generate(folder_copy, tmp_path / "images")) == 0  # was: "unexpected tensor 'decoder...'"
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
    manifest = json.loads((folder_copy / MANIFEST).read_text())
    names = {name for name, _ in read_tensors(folder_copy / "transformer", manifest["files"])}
    assert names and not any(n.startswith(("decoder.", "encoder.")) for n in names)


def test_stray_file_where_from_pretrained_looks_is_reported(capsys, folder_copy):
    stray = folder_copy / "tokenizer" / "added_tokens.json"
    stray.write_text("{}")
    err = cli_error(capsys, "verify", "--quick", folder_copy)
    assert err == (f"krea-lite: error: {stray} is not listed in {MANIFEST}, and loading tokenizer may read it; "
                   "remove it or re-create the folder")


def test_unknown_scheme_in_the_manifest_fails_verify(capsys, folder_copy, tmp_path):
    _edit_manifest(folder_copy, lambda m: m["components"]["transformer"].update(scheme="fp3"))
    err = cli_error(capsys, "verify", folder_copy)
    assert f"{folder_copy / MANIFEST} gives transformer the scheme 'fp3', which this krea-lite does not know" in err
    assert "edited or damaged" in err and "choose one of" not in err
    assert cli_error(capsys, *_generate(folder_copy, tmp_path / "images")) == err


def test_verify_lists_every_problem(capsys, folder_copy, tmp_path):
    (folder_copy / "text_encoder_2" / "config.json").unlink()
    vae = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:100])
    _edit_manifest(folder_copy, lambda m: (m["components"]["transformer"].update(scheme="fp3"),
                                           m["files"].pop("transformer/config.json")))
    assert main(["verify", "--quick", str(folder_copy)]) == 2
    lines = _errors(capsys)
    assert len(lines) == 4, lines
    for named in ("'fp3'", str(folder_copy / "text_encoder_2" / "config.json") + " is missing",
                  f"{vae} is 100 bytes", str(folder_copy / "transformer" / "config.json") + " is not listed"):
        assert sum(named in line for line in lines) == 1, (named, lines)
    # loading stops at the first, in one line that says there are more
    err = cli_error(capsys, *_generate(folder_copy, tmp_path / "images"))
    assert err == f"{lines[0]} (and 3 more: `krea-lite verify {folder_copy}` lists them all)"


def test_verify_checks_configs_and_quantized_weights(capsys, folder_copy):
    config = folder_copy / "transformer" / "config.json"
    config.write_text("[1, 2]" + " " * (config.stat().st_size - 6))  # same size: only the JSON is wrong
    first = json.loads((folder_copy / MANIFEST).read_text())["components"]["text_encoder_2"]["quantized_modules"][0]
    _edit_manifest(folder_copy, lambda m: m["components"]["text_encoder_2"]["quantized_modules"].append("nope.q"))
    assert first != "nope.q"
    assert main(["verify", "--quick", str(folder_copy)]) == 2
    assert _errors(capsys) == [
        f"krea-lite: error: {config} is not a JSON object; re-create the folder",
        f"krea-lite: error: {folder_copy / 'text_encoder_2'} lacks the weights of 1 quantized modules (first: "
        f"'nope.q') in the files {MANIFEST} lists; re-create the folder",
    ]


def test_components_that_loading_needs_are_described(capsys, folder_copy):
    _edit_manifest(folder_copy, lambda m: m["components"].pop("tokenizer_2"))
    (folder_copy / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    _edit_manifest(folder_copy, lambda m: m["files"]["model_index.json"].update(
        size=(folder_copy / "model_index.json").stat().st_size))
    err = cli_error(capsys, "verify", "--quick", folder_copy)
    assert "does not describe component 'tokenizer_2' that loading needs" in err


# ---------------------------------------------------------------------------------------------
# 5. errors that name what the user typed


def test_mistyped_local_path_says_it_is_not_a_folder(capsys, tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    err = quantize_refused(capsys, "work/tiny-srcc", tmp_path / "out")
    assert err.startswith("krea-lite: error: work/tiny-srcc is not a folder here (no such path), and as a Hugging "
                          "Face repo id it is not in the local Hugging Face cache"), err
    assert "check the path" in err


def test_single_file_without_base_names_the_default(capsys, untouched, tmp_path, offline):
    err = quantize_refused(capsys, untouched / "flux1-krea-dev.safetensors", tmp_path / "out")
    assert err == ("krea-lite: error: flux1-krea-dev.safetensors holds only the transformer; the VAE, text encoders "
                   "and tokenizers come from --base, by default black-forest-labs/FLUX.1-Krea-dev, which is not in "
                   "the local Hugging Face cache and the hub cannot be reached; connect to download it, or pass "
                   "--base with a local diffusers folder of FLUX.1")


def test_base_and_revision_are_refused_where_they_do_nothing(capsys, untouched, tmp_path):
    err = quantize_refused(capsys, untouched, tmp_path / "out", "--base", "owner/other")
    assert err == (f"krea-lite: error: --base owner/other is only used with a single-file source (.safetensors); "
                   f"{untouched} is a whole pipeline with its own components: drop --base")
    err = quantize_refused(capsys, untouched, tmp_path / "out", "--revision", "v2")
    assert err == (f"krea-lite: error: --revision v2 selects a version of a Hugging Face repo, but {untouched} is a "
                   "local folder, used as it is; drop --revision")
    err = quantize_refused(capsys, untouched / "flux1-krea-dev.safetensors", tmp_path / "out",
                           "--base", untouched, "--revision", "v2")
    assert "--revision v2" in err and f"but {untouched} is a local folder" in err


def test_symlinked_file_inside_the_folder_is_fine(capsys, folder_copy):
    config = folder_copy / "vae" / "config.json"
    (folder_copy / "vae" / "real-config.json").write_bytes(config.read_bytes())
    config.unlink()
    config.symlink_to("real-config.json")
    _edit_manifest(folder_copy, lambda m: m["files"].update(
        {"vae/real-config.json": dict(m["files"]["vae/config.json"])}))
    assert main(["verify", str(folder_copy)]) == 0


def test_newer_format_version_names_the_writer(capsys, folder_copy):
    _edit_manifest(folder_copy, lambda m: m.update(format_version=7, libraries={**m["libraries"], "krea-lite": "9.0"}))
    err = cli_error(capsys, "verify", folder_copy)
    assert "format_version 7 (it was written by krea-lite 9.0)" in err and "update krea-lite" in err
    assert "pip" not in err


# ---------------------------------------------------------------------------------------------
# 6. ordinary output mistakes: one line, exit 2, nothing left behind


@pytest.mark.parametrize("under", ["x", "deeper/x"])
def test_quantize_out_under_a_file(capsys, untouched, tmp_path, under):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / under
    err = cli_error(capsys, *_quantize(untouched, out))
    assert err == (f"krea-lite: error: --out {out} lies under {tmp_path / 'notes.txt'}, which is a file, not a "
                   "folder; choose another --out")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    _nothing_left(tmp_path)


def test_synth_out_under_a_file(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    err = cli_error(capsys, "synth", tmp_path / "notes.txt" / "x")
    assert f"lies under {tmp_path / 'notes.txt'}, which is a file" in err


@pytest.fixture
def read_only(monkeypatch, tmp_path):
    """`tmp_path/ro` behaves as a read-only location (as root, chmod alone would not stop writes)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro and mode & os.W_OK
                        else real(p, mode, **kw))
    return ro


@pytest.mark.parametrize("command", ["quantize", "synth"])
def test_read_only_location_is_refused_before_starting(capsys, untouched, read_only, command):
    out = read_only / "sub" / "x"
    argv = _quantize(untouched, out) if command == "quantize" else ["synth", str(out)]
    err = cli_error(capsys, *argv)
    option = "--out" if command == "quantize" else "folder"
    assert err == f"krea-lite: error: cannot write in {read_only} (read-only or no permission); choose another {option}"
    assert list(read_only.iterdir()) == []


def _fail_mkdir_under(monkeypatch, parent: Path, code: int) -> None:
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == parent and self.name.startswith("."):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("command", ["quantize", "synth"])
@pytest.mark.parametrize("code, says", [(errno.EROFS, "is on a read-only file system; nothing was written"),
                                        (errno.EACCES, "permission denied writing")])
def test_unwritable_location_found_while_writing(capsys, untouched, tmp_path, monkeypatch, command, code, says):
    out = tmp_path / "models" / "x"
    _fail_mkdir_under(monkeypatch, out.parent, code)
    argv = _quantize(untouched, out) if command == "quantize" else ["synth", str(out)]
    err = cli_error(capsys, *argv)
    assert says in err and str(out.parent) in err
    assert not (tmp_path / "models").exists()  # the parent this run created is gone again


def _disk_full_in_safetensors(monkeypatch):
    """What safetensors 0.8 raises when the disk fills (not an OSError)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def test_quantize_disk_full_as_safetensors_reports_it(capsys, untouched, tmp_path, monkeypatch):
    _disk_full_in_safetensors(monkeypatch)
    out = tmp_path / "out"
    err = quantize_refused(capsys, untouched, out)
    assert err == f"krea-lite: error: disk full while writing {out}: nothing was kept; free space and run again"
    _nothing_left(tmp_path)


def test_synth_disk_full(capsys, tmp_path, monkeypatch):
    _disk_full_in_safetensors(monkeypatch)
    out = tmp_path / "syn"
    err = cli_error(capsys, "synth", out)
    assert err == f"krea-lite: error: disk full while writing {out}: nothing was kept; free space and run again"
    assert not out.exists()
    _nothing_left(tmp_path)


def test_verify_unreadable_files(capsys, folder_copy, monkeypatch):
    from krea_lite import checkpoint

    target = folder_copy / "transformer" / "diffusion_pytorch_model.safetensors"

    def denied(path, *args, **kwargs):
        if Path(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", denied, raising=False)
    err = cli_error(capsys, "verify", folder_copy)
    assert err == f"krea-lite: error: {target} cannot be read (Permission denied); make it readable for this user"
