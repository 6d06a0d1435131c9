"""The CLI a new user meets (issue 10): bounded inputs, no silent overwrites, honest output, and the
commands and options people expect (--version, info, --json, --seed random, --name, --format).

Most cases run `krea_lite.cli.main` end to end on the tiny synthetic model; inputs that must be refused
before the model loads point --model at a folder that does not exist, so a check that came too late
would report that folder instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import krea_lite
from krea_lite.cli import main
from krea_lite.errors import KreaLiteError

SRC = Path(krea_lite.__file__).resolve().parent.parent  # the krea_lite under test, for subprocesses
FAST = ["--device", "cpu", "--quiet", "--steps", "1", "--width", "16", "--height", "16"]


def cli_error(capsys, *argv) -> str:
    """Run the CLI, expect a user error: exit 2 and exactly one `krea-lite: error:` line on stderr."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"exit {rc}, stderr: {err!r}"
    assert err.startswith("krea-lite: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def run_ok(capsys, *argv) -> tuple[str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, f"exit {rc}, stderr: {err!r}"
    return out, err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC)}


# ---------------------------------------------------------------------------------------------
# 3. bounded inputs: one line each, before the model loads


@pytest.mark.parametrize("flags, named", [
    (["--steps", "1000000000"], "--steps 1000000000 must be an integer from 1 to 1000"),
    (["--steps", str(10**10)], f"--steps {10**10} must be an integer from 1 to 1000"),
    (["--width", "65536"], "--width 65536 must be a multiple of 16 from 16 to 4096"),
    (["--height", "8"], "--height 8 must be a multiple of 16 from 16 to 4096"),
    (["--seed", str(2**64)], f"--seed {2**64} must be an integer from 0 to {2**64 - 1}"),
    (["--seed", str(2**64 - 1), "--num-images", "2"], f"--seed {2**64 - 1} must be an integer from 0 to {2**64 - 2}"),
    (["--seed", "-1"], "--seed -1 must be an integer from 0"),
    (["--num-images", str(10**9)], f"--num-images {10**9} must be an integer from 1 to 1000"),
    (["--vram-gb", "inf"], "--vram-gb inf must be the card's memory in GiB, a finite number up to 1024"),
    (["--vram-gb", "nan"], "--vram-gb nan must be"),
    (["--vram-gb", "5000"], "--vram-gb 5000 must be"),
    (["--name", "{x}"], "uses {x}, which is not a field"),
    (["--name", "a/{n}"], "may not contain /"),
    (["--name", "{prompt:03d}"], "cannot be filled in"),
    (["--name", "{n"], "is not a valid template"),
])
def test_out_of_range_generate_inputs_are_one_line_before_loading(capsys, tmp_path, flags, named):
    err = cli_error(capsys, "generate", "--model", tmp_path / "never-loaded", "--device", "cpu", "a fox", *flags)
    assert named in err


@pytest.mark.parametrize("flags, named", [
    (["--vram-gb", "inf"], "--vram-gb inf must be the card's memory in GiB"),
    (["--vram-gb", "1e308"], "--vram-gb 1e+308 must be"),
    (["--width", "65536"], "--width 65536 must be a multiple of 16 from 16 to 4096"),
    (["--batch", "0"], "--batch 0 must be an integer from 1 to 64"),
])
def test_out_of_range_plan_inputs_are_one_line(capsys, tmp_path, flags, named):
    assert named in cli_error(capsys, "plan", "--model", tmp_path / "never-loaded", *flags)


def test_prompt_file_is_bounded(capsys, tmp_path):
    start = time.perf_counter()
    err = cli_error(capsys, "generate", "--model", tmp_path, "--prompts", "/dev/zero")
    assert "prompt file /dev/zero is larger than 1 MiB" in err and time.perf_counter() - start < 30
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a fox\0\0\n")
    assert "holds NUL bytes" in cli_error(capsys, "generate", "--model", tmp_path, "--prompts", nul)
    many = tmp_path / "many.txt"
    many.write_text("a fox\n" * 10_001)
    assert "holds 10001 prompts; at most 10000" in cli_error(capsys, "generate", "--model", tmp_path, "--prompts", many)


def test_prompt_and_prompt_file_together_are_refused(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog\n")
    err = cli_error(capsys, "generate", "--model", tmp_path / "never-loaded", "a fox", "--prompts", prompts)
    assert "either a prompt or --prompts FILE, not both" in err


def test_ctrl_c_stops_between_denoising_steps(capsys, quantized, tmp_path, monkeypatch):
    """The first Ctrl-C lets the running step finish, then stops: exit 130, no image written."""
    from diffusers import FluxTransformer2DModel

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # else the SIGINT below would hit pytest
    forward, calls = FluxTransformer2DModel.forward, {"started": 0, "finished": 0}

    def counting(self, *args, **kwargs):
        calls["started"] += 1
        if calls["started"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 2
        out = forward(self, *args, **kwargs)
        calls["finished"] += 1
        return out

    monkeypatch.setattr(FluxTransformer2DModel, "forward", counting)
    out_dir = tmp_path / "png"
    rc = main(["generate", "--model", str(quantized("nf4")), "a fox", "--out", str(out_dir), *FAST,
               "--steps", "50"])
    err = capsys.readouterr().err
    assert rc == 130
    assert calls == {"started": 2, "finished": 2}, calls  # step 2 ran to its end; step 3 never started
    assert "krea-lite: stopping after this step (Ctrl-C again to stop at once)" in err
    assert err.strip().endswith("krea-lite: interrupted") and "Traceback" not in err
    assert not list(out_dir.glob("*")), list(out_dir.glob("*"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_ctrl_c_while_importing_prints_one_line(quantized):
    """Ctrl-C in the first second, while torch and diffusers import: one line, exit 130, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "krea_lite.cli", "plan", "--model", str(quantized("nf4"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    maps = Path(f"/proc/{proc.pid}/maps")  # torch is imported inside main() only: wait until it starts loading
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip() == "krea-lite: interrupted", err


# ---------------------------------------------------------------------------------------------
# 2. no silent overwrites; the metadata names the model and the krea-lite version


def test_a_second_run_never_replaces_an_image(capsys, quantized, tmp_path):
    from krea_lite import __version__
    from krea_lite.generate import read_metadata

    model, out_dir = quantized("nf4"), tmp_path / "png"
    args = ["generate", "--model", model, "a red fox", "--out", out_dir, *FAST]
    first_out, _ = run_ok(capsys, *args)
    first = out_dir / "000-a-red-fox-seed0.png"
    assert first_out.startswith(f"{first}  (") and first.is_file()
    before = sha(first)
    second_out, _ = run_ok(capsys, *args, "--guidance", "2")
    second = out_dir / "000-a-red-fox-seed0-2.png"
    assert second_out.startswith(f"{second}  (") and sha(first) == before
    assert read_metadata(second)["guidance"] == "2.0" and read_metadata(first)["guidance"] == "4.5"
    meta = read_metadata(first)
    assert meta["krea_lite_version"] == __version__ and meta["model"] == str(model.resolve())
    # --overwrite replaces the earlier file, and nothing else
    run_ok(capsys, *args, "--guidance", "3", "--overwrite")
    assert read_metadata(first)["guidance"] == "3.0" and read_metadata(second)["guidance"] == "2.0"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([first.name, second.name])


def test_overwrite_never_replaces_an_image_of_the_same_run(capsys, quantized, tmp_path):
    out_dir = tmp_path / "png"
    out, _ = run_ok(capsys, "generate", "--model", quantized("nf4"), "a fox", "--out", out_dir, *FAST,
                    "--num-images", "2", "--name", "{prompt}", "--overwrite")
    assert sorted(p.name for p in out_dir.iterdir()) == ["a-fox-2.png", "a-fox.png"]
    assert out.count(str(out_dir)) == 2


# ---------------------------------------------------------------------------------------------
# 6. ordinary mistakes: read-only output, full disk, --debug after the subcommand


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys (read-only for everyone, root included)")
def test_read_only_output_is_refused_before_loading(capsys, tmp_path):
    probe = Path("/sys/krea-lite-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here")
    err = cli_error(capsys, "generate", "--model", tmp_path / "never-loaded", "a fox", "--out", "/sys/krea-out")
    assert err.startswith("krea-lite: error: --out /sys/krea-out: /sys cannot be written (")
    assert "choose a folder you can write to" in err


def _fail_link(monkeypatch, code: int, after: int):
    """os.link (how generate publishes each image) fails with `code` from call `after` + 1 on."""
    real, calls = os.link, []

    def link(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) > after:
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", link)


def test_full_disk_reports_the_images_already_written(capsys, quantized, tmp_path, monkeypatch):
    out_dir = tmp_path / "png"
    _fail_link(monkeypatch, errno.ENOSPC, after=1)
    rc = main(["generate", "--model", str(quantized("nf4")), "a fox", "--out", str(out_dir), *FAST,
               "--num-images", "2"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out.strip().startswith(f"{out_dir / '000-a-fox-seed0.png'}  (")  # reported when it was written
    assert err.strip() == (f"krea-lite: error: disk full while writing {out_dir / '000-a-fox-seed1.png'} (1 image "
                           "written before it; nothing partial was kept): free some space or choose another --out")
    assert sorted(p.name for p in out_dir.iterdir()) == ["000-a-fox-seed0.png"]  # no temporary file left


def test_unwritable_file_is_one_line(capsys, quantized, tmp_path, monkeypatch):
    _fail_link(monkeypatch, errno.EROFS, after=0)
    err = cli_error(capsys, "generate", "--model", quantized("nf4"), "a fox", "--out", tmp_path / "png", *FAST)
    assert "cannot write" in err and "Read-only file system; 0 images written before it" in err
    assert not list((tmp_path / "png").iterdir())


def test_debug_works_after_the_subcommand(capsys, tmp_path):
    with pytest.raises(KreaLiteError, match="is not a folder"):
        main(["verify", "--debug", str(tmp_path / "nope")])
    with pytest.raises(KreaLiteError, match="is not a folder"):
        main(["generate", "--model", str(tmp_path / "nope"), "--debug", "--device", "cpu", "a fox"])
    assert "is not a folder" in cli_error(capsys, "verify", tmp_path / "nope")  # and without it, one line


# ---------------------------------------------------------------------------------------------
# 7. honest help and output


def test_verbose_and_verify_say_what_they_did_on_the_cpu(capsys, quantized, tmp_path):
    from krea_lite.checkpoint import read_manifest

    model = quantized("nf4")
    n = len(read_manifest(model)["files"])
    out, _ = run_ok(capsys, "generate", "--model", model, "a fox", "--out", tmp_path, *FAST, "--verify", "--verbose")
    assert re.search(rf"^verified {n} files of {re.escape(str(model))} against the manifest \(sizes, headers, "
                     r"sha256\) in \d+\.\d s$", out, re.M), out
    assert re.search(r"^device cpu; loaded \d+\.\d\d MiB in verify ", out, re.M), out
    assert "CPU: no placement plan" in out


def test_one_step_is_reported_as_one_step(capsys, quantized, tmp_path):
    out, _ = run_ok(capsys, "generate", "--model", quantized("nf4"), "a fox", "--out", tmp_path, *FAST)
    assert re.search(r"\(\d+\.\d s, 1 step\)$", out.strip()) and "after the first" not in out
    out, _ = run_ok(capsys, "generate", "--model", quantized("nf4"), "a fox", "--out", tmp_path, *FAST,
                    "--steps", "2")
    assert re.search(r"\d\.\d{3} s/step after the first\)$", out.strip()), out


def test_keep_everything_warns_and_small_sizes_are_readable(capsys, tiny_source, tmp_path):
    """quantize --keep '*': the table says bf16 and one warning line says why; sizes are MiB/KiB, not
    "0.00 GiB"; the progress bar shows no ETA until one means something."""
    rc = main(["quantize", str(tiny_source), "--out", str(tmp_path / "q"), "--keep", "*", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert re.search(r"^transformer\s+bf16 \(all kept\)\s+\d+\.\d\d MiB\s+\d+\.\d\d MiB$", out, re.M), out
    assert re.search(r"^scheduler\s+copied\s+\d+\.\d KiB\s+\d+\.\d KiB$", out, re.M), out
    assert "0.00 GiB" not in out
    assert ("krea-lite: warning: --keep '*' matched every Linear of transformer and text_encoder_2: nothing there "
            "was quantized, it is stored in bf16") in err.splitlines()
    for h, m, s in re.findall(r"<(?:(\d+):)?(\d\d):(\d\d)", err):  # every ETA the bar printed
        assert int(h or 0) == 0, f"ETA {h}:{m}:{s} in {err!r}"


def test_progress_bar_shows_an_eta_only_once_it_means_something(capsys):
    from krea_lite.progress import ETA_AFTER, progress_bar

    bar = progress_bar(total=10_000_000, unit="B", unit_scale=True, desc="quantize", file=sys.stderr)
    time.sleep(0.2)
    bar.update(512)
    early = str(bar)
    bar.update(int(ETA_AFTER * 10_000_000))
    later = str(bar)
    bar.close()
    assert "<" not in early and "B/s" not in early and "ETA after 5%" in early, early
    assert re.search(r"<\d\d:\d\d, ", later) and "B/s" in later, later


def test_synthetic_progress_moves_per_tensor(tmp_path):
    """A full-size shard takes minutes to make: the bar moves per tensor, not once per shard."""
    from concurrent.futures import ThreadPoolExecutor

    from krea_lite import synthetic

    cfg = synthetic._configs("tiny")["transformer"]
    model = synthetic._meta_model("transformer", cfg)
    updates = []

    class Bar:
        def update(self, n):
            updates.append(n)

    with ThreadPoolExecutor(2) as pool:
        synthetic._write_component(tmp_path, "transformer", model, 0, 8 << 20, pool, Bar())
    specs = synthetic._specs(model)
    assert len(updates) == len(specs) > 2 * len(list(tmp_path.glob("*.safetensors")))
    assert sum(updates) == sum(p.stat().st_size for p in tmp_path.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in tmp_path.glob("*.safetensors"))


def test_synth_full_says_it_takes_minutes(capsys, tmp_path, monkeypatch):
    from krea_lite import synthetic

    asked = []
    monkeypatch.setattr(synthetic, "write_synthetic", lambda out, **kw: asked.append(kw) or out)  # writes nothing
    _, err = run_ok(capsys, "synth", tmp_path / "full", "--size", "full")
    assert asked and asked[0]["size"] == "full"
    assert err.strip() == (f"writing a full-size synthetic FLUX pipeline (random weights, ~34 GB + 24 GB single "
                           f"file) to {tmp_path / 'full'}; this takes minutes")


def test_help_of_every_argument(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    assert re.search(r"folder\s+folder written by `krea-lite quantize`", capsys.readouterr().out)


def test_dir_lists_the_lazy_api():
    import krea_lite

    names = dir(krea_lite)
    assert {"load_pipeline", "quantize_pipeline", "verify_checkpoint", "GenerateConfig", "__version__"} <= set(names)
    assert krea_lite.OutputConfig().format == "png"


def test_first_load_prints_no_library_noise(quantized):
    """bitsandbytes' optional-kernel warning and transformers' torchvision fallbacks are dropped when
    krea-lite loads them; `import krea_lite` itself installs nothing."""
    code = (
        "import logging, krea_lite\n"
        "names = ('bitsandbytes.backends.cpu.ops', 'transformers.utils.import_utils')\n"
        "assert not any(logging.getLogger(n).filters for n in names), 'import krea_lite installed a filter'\n"
        f"pipe = krea_lite.load_pipeline({str(quantized('nf4'))!r}, device='cpu')\n"
        "assert all(logging.getLogger(n).filters for n in names)\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes warning')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr and "torchvision" not in proc.stderr, proc.stderr
    assert "another bitsandbytes warning" in proc.stderr  # only those messages are dropped


# ---------------------------------------------------------------------------------------------
# 8. --version, info, --json, --seed random, --name, --format


def test_version(capsys):
    from krea_lite import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"krea-lite {__version__}"


def test_seed_random_is_printed_and_stored(capsys, quantized, tmp_path):
    from krea_lite.generate import read_metadata

    out, _ = run_ok(capsys, "generate", "--model", quantized("nf4"), "a fox", "--out", tmp_path, *FAST,
                    "--seed", "random", "--num-images", "2")
    seed = int(re.search(r"^seed (\d+) \(random; pass --seed \1 to repeat\)$", out, re.M).group(1))
    files = sorted(tmp_path.glob("*.png"))
    assert [read_metadata(p)["seed"] for p in files] == [str(seed), str(seed + 1)]
    assert [p.name for p in files] == [f"000-a-fox-seed{seed}.png", f"000-a-fox-seed{seed + 1}.png"]


def test_name_template(capsys, quantized, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red fox, in snow!\n\na dog\n")
    run_ok(capsys, "generate", "--model", quantized("nf4"), "--prompts", prompts, "--out", tmp_path / "png", *FAST,
           "--num-images", "2", "--seed", "5", "--name", "{n:03d}-{i}{k}-{prompt}-{seed}-{steps}-{model}-{scheme}")
    model = quantized("nf4").name  # "nf4-nf4": {model} is the folder's name
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        f"000-00-a-red-fox-in-snow-5-1-{model}-nf4.png", f"001-01-a-red-fox-in-snow-6-1-{model}-nf4.png",
        f"002-10-a-dog-5-1-{model}-nf4.png", f"003-11-a-dog-6-1-{model}-nf4.png"]


@pytest.mark.parametrize("fmt, pillow", [("png", "PNG"), ("webp", "WEBP"), ("jpg", "JPEG")])
def test_every_format_carries_the_same_settings(capsys, quantized, tmp_path, fmt, pillow):
    from PIL import Image

    from krea_lite.generate import read_metadata

    prompt = "un renard roux à l'aube, 狐"
    out, _ = run_ok(capsys, "generate", "--model", quantized("nf4"), prompt, "--out", tmp_path, *FAST,
                    "--format", fmt, "--seed", "11")
    (path,) = tmp_path.iterdir()
    assert path.suffix == f".{fmt}" and out.startswith(str(path))
    with Image.open(path) as image:
        assert image.format == pillow and image.size == (16, 16)
    meta = read_metadata(path)
    assert meta["prompt"] == prompt and meta["seed"] == "11" and meta["steps"] == "1"
    assert meta["scheme_transformer"] == "nf4" and meta["software"] == "krea-lite"
    assert set(meta) >= {"guidance", "width", "height", "max_sequence_length", "model", "model_manifest_sha256",
                         "krea_lite_version"}
    png = tmp_path.parent / f"{tmp_path.name}-png"
    run_ok(capsys, "generate", "--model", quantized("nf4"), prompt, "--out", png, *FAST, "--seed", "11")
    assert read_metadata(next(png.iterdir())) == meta  # the same settings whatever the format


def test_verify_json(capsys, quantized, tmp_path):
    from krea_lite.checkpoint import read_manifest

    out, _ = run_ok(capsys, "verify", quantized("nf4"), "--json")
    data = json.loads(out)
    assert data["ok"] is True and data["files"] == len(read_manifest(quantized("nf4"))["files"])
    assert data["checked"] == "sizes, headers and sha256"
    rc = main(["verify", str(tmp_path), "--json", "--quick"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 2 and data["ok"] is False and "has no krea_lite.json" in data["error"]


def test_plan_json_is_the_plan(capsys, quantized):
    from krea_lite.pipeline import load_pipeline
    from krea_lite.plan import card_budget, measure, plan_for_budget

    out, _ = run_ok(capsys, "plan", "--model", quantized("nf4"), "--vram-gb", "2", "--width", "512",
                    "--height", "512", "--json")
    data = json.loads(out)
    plan = plan_for_budget(measure(load_pipeline(quantized("nf4"), device="cpu")), card_budget(2), width=512,
                           height=512)
    assert data["budget_bytes"] == card_budget(2) == plan.budget_bytes and data["vram_gb"] == 2
    assert data["peak_bytes"] == plan.peak_bytes and data["phase_bytes"] == dict(plan.phase_bytes)
    assert data["streamed_single"] == list(plan.streamed_single) and data["vae_tiled"] == plan.vae_tiled


def test_info_text_and_json(capsys, quantized):
    from krea_lite.checkpoint import read_manifest
    from krea_lite.pipeline import load_pipeline
    from krea_lite.plan import card_budget, measure, plan_for_budget

    folder = quantized("nf4")
    manifest = read_manifest(folder)
    data = json.loads(run_ok(capsys, "info", folder, "--json")[0])
    assert data["folder"] == str(folder.resolve()) and data["written_by"] == manifest["libraries"]["krea-lite"]
    assert data["source"] == manifest["source"]
    assert data["components"]["transformer"] == {
        "scheme": "nf4", "bytes": manifest["components"]["transformer"]["bytes"],
        "source_bytes": manifest["components"]["transformer"]["source_bytes"],
        "quantized_modules": len(manifest["components"]["transformer"]["quantized_modules"]),
        "kept_modules": len(manifest["components"]["transformer"]["kept_modules"])}
    assert [c["vram_gb"] for c in data["cards"]] == [4, 6, 8, 10, 12, 16, 24]
    sizes = measure(load_pipeline(folder, device="cpu"))
    smallest = data["smallest_card_gb"]
    plan_for_budget(sizes, card_budget(smallest))  # fits
    with pytest.raises(KreaLiteError):
        plan_for_budget(sizes, card_budget(round(smallest - 0.1, 1)))  # and 0.1 GiB less does not
    text = run_ok(capsys, "info", folder)[0]
    assert re.search(r"^transformer\s+nf4\s+\d+ / \d+\s+\d+\.\d\d MiB$", text, re.M), text
    assert f"smallest card: {smallest} GiB" in text and "(synthetic: random weights)" in text
