"""Fault tests: a conversion SIGKILLed at any stage leaves nothing that verifies or loads, and the next
run cleans up and succeeds; one flipped byte in a quantized file is found and named by `verify`.

The kill points are deterministic: `KREA_LITE_TEST_KILL_AT=<stage>` makes the converter SIGKILL itself
at that stage (`krea_lite.checkpoint._kill_point`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import krea_lite
from krea_lite.checkpoint import KILL_AT_ENV, MANIFEST, verify_checkpoint, weight_files
from krea_lite.cli import main
from krea_lite.errors import KreaLiteError

from .test_errors import cli_error, tree_hash

SRC_ROOT = Path(krea_lite.__file__).resolve().parent.parent


def _refused(folder: Path) -> None:
    """Neither `verify_checkpoint` (quick or full) nor `load_pipeline` accepts `folder`."""
    from krea_lite.pipeline import load_pipeline

    for full in (False, True):
        with pytest.raises(KreaLiteError):
            verify_checkpoint(folder, full=full)
    for verify in ("quick", "none"):
        with pytest.raises(KreaLiteError):
            load_pipeline(folder, device="cpu", verify=verify)


def krea_lite_process(*argv, **env) -> subprocess.CompletedProcess:
    """`python -m krea_lite.cli ARGV` in a fresh process, as a user runs it."""
    env = {**os.environ, **env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "krea_lite.cli", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("stage", ["shard", "manifest", "rename"])
def test_sigkill_leaves_nothing_that_loads_and_rerun_succeeds(stage, tiny_source, tmp_path, capsys):
    before = tree_hash(tiny_source)
    work = tmp_path / "models"
    work.mkdir()
    out = work / "krea-nf4"
    proc = krea_lite_process("quantize", tiny_source, "--out", out, "--device", "cpu", "--quiet",
                             **{KILL_AT_ENV: stage})
    assert proc.returncode == -signal.SIGKILL, f"not killed at {stage!r}: rc {proc.returncode}\n{proc.stderr}"

    left = sorted(work.iterdir())
    assert left, "the kill came too early: nothing was written"
    assert (out in left) == (stage == "rename")  # the final name appears only once the folder is renamed
    for folder in left:
        _refused(folder)
    _refused(out)

    # the next run, without --force, removes the leftovers and succeeds
    assert main(["quantize", str(tiny_source), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert sorted(work.iterdir()) == [out]
    verify_checkpoint(out, full=True)
    assert tree_hash(tiny_source) == before


def test_flipped_byte_is_named_by_verify(quantized, tmp_path, capsys):
    folder = Path(shutil.copytree(quantized("nf4"), tmp_path / "krea-nf4"))
    path = weight_files(folder / "transformer")[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the tensor data: size and header still look right
    path.write_bytes(bytes(data))

    err = cli_error(capsys, "verify", folder)
    assert err == (f"krea-lite: error: {path} does not match its sha256 in {MANIFEST}: damaged; re-create it")
    assert main(["verify", "--quick", str(folder)]) == 0  # quick: sizes and headers only, by design
    capsys.readouterr()
    with pytest.raises(KreaLiteError, match=str(path)):
        from krea_lite.pipeline import load_pipeline

        load_pipeline(folder, device="cpu", verify="full")
    # in a fresh process, where library warnings (missing optional kernels, ...) would also show:
    # stderr is still the one error line
    proc = krea_lite_process("generate", "--model", folder, "--device", "cpu", "--verify", "a fox")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [err], proc.stderr


def test_flipped_header_byte_is_caught_on_every_load(quantized, tmp_path, capsys):
    folder = Path(shutil.copytree(quantized("nf4"), tmp_path / "krea-nf4"))
    path = weight_files(folder / "text_encoder_2")[0]
    data = bytearray(path.read_bytes())
    data[9] ^= 0x80  # second byte of the JSON header: no longer valid UTF-8
    path.write_bytes(bytes(data))
    err = cli_error(capsys, "generate", "--model", folder, "--device", "cpu", "a fox")  # quick verify
    assert str(path) in err and "corrupted safetensors header" in err
