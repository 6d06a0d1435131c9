"""krea-lite bench: the harness (children, crashes, resume, reports) and the README generator.

The fast tests need no model. The slow one runs the real matrix on the tiny synthetic pipeline on
the CPU (budgets and CUDA-only anchors are recorded as skipped there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from krea_lite import bench

ROOT = Path(__file__).resolve().parent.parent


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def _render_readme():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "scripts" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# fast: no model, no child


def test_import_is_light():
    code = "import sys, krea_lite.bench; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src")})


def test_ssim_and_psnr():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert bench.ssim(a, a) == pytest.approx(1.0)
    assert bench.psnr(a, a) is None  # identical: no finite PSNR
    noisy = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert 0 < bench.ssim(a, noisy) < 1
    assert bench.ssim(a, noisy) > bench.ssim(a, rng.integers(0, 256, a.shape, dtype=np.uint8))
    mse = np.mean((a.astype(float) - noisy) ** 2)
    assert bench.psnr(a, noisy) == pytest.approx(10 * np.log10(255**2 / mse))


def test_quick_matrix_order():
    s = bench._settings(_args("--quick"))
    cells = bench.plan_cells(s, ["nf4", "int8"], have_source=True, have={"bf16": True, "nf4": True})
    ids = [c["id"] for c in cells]
    assert len(ids) == len(set(ids))
    assert ids[:4] == [f"krea nf4 {b} 1024x1024 b1" for b in ("none", "8GiB", "6GiB", "4GiB")]
    assert ids[4] == "krea int8 none 1024x1024 b1"  # every scheme at the first resolution first
    assert [c["kind"] for c in cells[8:14]] == ["anchor"] * 5 + ["ref"]
    anchors = {c["id"]: c["budget_gib"] for c in cells if c["kind"] == "anchor"}
    assert anchors["anchor bf16_resident 1024x1024 b1"] is None  # the card that fits everything: uncapped
    assert anchors["anchor nf4_group_leaf_stream 8GiB 1024x1024 b1"] == 8  # the others at the same cap as ours
    assert ids[14] == "krea nf4 none 512x512 b1"  # other resolutions last
    s = bench._settings(_args("--quick", "--interleave", "3", "--interleave-only", "--against", "nf4"))
    only = bench.plan_cells(s, ["gguf", "nf4"], have_source=True, have={"bf16": True, "nf4": True})
    assert [(c["kind"], c["name"], c["against_schemes"]) for c in only] == [("ratio", "gguf", ["nf4"]),
                                                                           ("ratio", "nf4", [])]
    assert only[0]["id"].startswith("ratio gguf vs nf4 1024x1024")
    assert {c["width"] for c in cells if c["kind"] == "anchor"} == {1024}
    both = bench.plan_cells(bench._settings(_args("--quick", "--anchor-budgets", "none", "8")), ["nf4"],
                            have_source=True, have={"bf16": True, "nf4": True})
    assert sum(c["kind"] == "anchor" for c in both) == 1 + 4 * 2
    assert s["steps"] == 3 and s["e2e_steps"] == 4 and s["time_budget"] == 540
    # a flag beats the preset
    assert bench._settings(_args("--quick", "--budgets", "none", "12"))["budgets"] == [None, 12.0]


def _doc() -> dict:
    """A result document as `run` writes it, with two budgets, anchors, a crash and fidelity."""
    def cell(kind, name, budget, **metrics):
        bn = bench._budget_name(budget)
        return {"id": f"{kind} {name} {bn} 1024x1024 b1", "kind": kind, "name": name, "budget_gib": budget,
                "width": 1024, "height": 1024, "batch": 1, "e2e_steps": 4, "status": "ok", "metrics": metrics}

    crash = cell("anchor", "nf4_group_block_stream", None)
    crash.update(status="crash", error="RuntimeError: CUDA error: an illegal memory access was encountered")
    return {
        "format_version": 1, "date": "2026-11-27T10:00:00Z", "label": bench.SYNTHETIC_LABEL, "synthetic": True,
        "env": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "cuda_version": "13.0", "h2d_gbps": 50.0,
                "torch": "2.11.0", "diffusers": "0.42.1", "commit": "abc123"},
        "settings": {"preset": "quick", "resolutions": [[1024, 1024]], "batches": [1], "budgets": [None, 8, 4]},
        "models": {"nf4": {"size_gib": 9.1}},
        "cells": [
            cell("krea", "nf4", None, s_per_step=0.18, peak_reserved_gib=14.0, e2e_s=2.0, streamed_gib=0.0),
            cell("krea", "nf4", 8, s_per_step=0.19, peak_reserved_gib=7.5, e2e_s=2.1, streamed_gib=2.0),
            cell("krea", "nf4", 4, s_per_step=0.30, peak_reserved_gib=3.9, e2e_s=2.9, streamed_gib=5.5),
            cell("anchor", "bf16_resident", None, s_per_step=0.172, peak_reserved_gib=23.0), crash,
        ],
    }


def test_reports_label_and_dominance(tmp_path):
    doc = _doc()
    section = bench.render_section(doc, "r")
    assert section.startswith(f"**{bench.SYNTHETIC_LABEL}**") and "NVIDIA H100" in section
    assert "CUDA error: an illegal memory access" in section and "1.05x" in section  # nf4 none vs bf16
    dom = bench.dominance(doc)
    assert len(dom) == 2
    assert "8 GiB" in dom[0] and "compute dominates" in dom[0] and "overlap poorly" not in dom[0]
    assert "4 GiB" in dom[1] and "compute dominates" in dom[1] and "0.118 s" in dom[1]  # 5.5 GiB / 50 GB/s
    assert "overlap poorly" in dom[1]  # 0.30 s measured, 0.18 s compute
    doc["cells"][2]["metrics"]["copy_wait_ms_per_step"] = 2.0  # the GPU barely waited: not the copies
    assert "not copy waits" in bench.dominance(doc)[1] and "overlap poorly" not in bench.dominance(doc)[1]
    doc["env"]["h2d_gbps"] = 20.0
    assert "weight traffic dominates" in bench.dominance(doc)[1]  # 0.295 s of copy > 0.18 s of compute
    doc["cells"][1]["fidelity"] = {"step_equals_resident": False}
    rows = {r.split(" | ")[1]: r for r in bench.markdown_table(doc).splitlines() if r.startswith("| krea-lite")}
    assert " 1.06x (output differs!) " in rows["8GiB"] and " 1.67x " in rows["4GiB"]  # vs the uncapped nf4 cell
    assert " 1.05x " in rows["8GiB"]  # e2e 2.1 s vs 2.0 s
    paths = bench.save_reports(doc, tmp_path / "r.json", plots=True)
    assert [p.name for p in paths] == ["r.json", "r.md", "r-vram.png", "r-budget.png", "r-tokens.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_the_readme_shows_the_newest_committed_benchmark():
    """README.md's results section is what scripts/render_readme.py makes of the newest committed JSON."""
    assert _render_readme().main(["--check"]) == 0, "run: python scripts/render_readme.py"


def test_render_readme_replaces_only_the_marked_section(tmp_path):
    rr = _render_readme()
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "old.json").write_text(json.dumps({**_doc(), "date": "2026-01-01T00:00:00Z"}))
    (results / "new.json").write_text(json.dumps(_doc()))
    readme = tmp_path / "README.md"
    before, after = "# krea-lite\n\nintro\n\n", "\n\n## Later\ntext\n"
    readme.write_text(f"{before}{rr.START}\nstale\n{rr.END}{after}")
    args = ["--readme", str(readme), "--results", str(results)]
    assert rr.main(args) == 0
    first = readme.read_text()
    assert first.startswith(before + rr.START) and first.endswith(rr.END + after) and "stale" not in first
    assert "benchmarks/results/new-vram.png" in first and "2026-11-27" in first
    assert rr.main(args) == 0 and readme.read_text() == first  # deterministic
    assert rr.main(args + ["--check"]) == 0
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit) as e:
        rr.main(args)
    assert "bench:start" in str(e.value)


# ---------------------------------------------------------------------------------------------
# slow: the real harness, children and all, on the tiny synthetic pipeline (CPU)


@pytest.mark.slow
def test_bench_tiny_cpu_crash_and_resume(tiny_source, tmp_path, monkeypatch):
    out = tmp_path / "results" / "tiny.json"
    argv = ["--source", str(tiny_source), "--workdir", str(tmp_path / "work"), "--schemes", "nf4",
            "--budgets", "none", "8", "--resolutions", "64x64", "80x48", "--batches", "1", "--steps", "2",
            "--warmup", "1", "--e2e-steps", "2", "--text-tokens", "8", "--anchors", "bf16_resident",
            "nf4_group_leaf_stream", "--anchor-budgets", "none", "--anchor-resolution", "64x64", "--device", "cpu", "--cell-timeout", "300", "--out", str(out)]
    monkeypatch.setenv(bench.ABORT_ENV, "krea nf4 none 80x48")  # this child calls os.abort()
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    assert bench.run(_args(*argv)) == 0

    doc = json.loads(out.read_text())
    cells = {c["id"]: c for c in doc["cells"]}
    assert set(cells) == {"krea nf4 none 64x64 b1", "krea nf4 8GiB 64x64 b1", "krea nf4 none 80x48 b1",
                          "krea nf4 8GiB 80x48 b1", "anchor bf16_resident 64x64 b1",
                          "anchor nf4_group_leaf_stream 64x64 b1", "ref bf16 64x64 b1", "ref bf16 80x48 b1"}
    assert doc["label"] == bench.SYNTHETIC_LABEL and doc["synthetic"] is True
    assert doc["prepare"]["quantize nf4"]["status"] == "ok"
    ok = cells["krea nf4 none 64x64 b1"]
    assert ok["status"] == "ok", ok.get("error")
    m = ok["metrics"]
    assert m["s_per_step"] > 0 and len(m["step_times_s"]) == 2 and m["e2e_s"] > 0 and m["load_s"] > 0
    assert m["host_rss_peak_gib"] > 0 and doc["models"]["nf4"]["size_gib"] > 0
    assert m["host_rss_peak_gib"] == max(m["host_rss_load_peak_gib"], m["host_rss_gen_peak_gib"])
    assert 0 < m["host_rss_anon_gen_peak_gib"] <= m["host_rss_gen_peak_gib"]
    assert set(m["load_seconds"]) == {"verify", "transformer", "text_encoder_2", "clip_vae_tokenizers"}  # CPU: no place
    assert 0 < ok["fidelity"]["latent_rel_err"] < 2 and 0 < ok["fidelity"]["step_rel_err"] < 1
    assert -1 <= ok["fidelity"]["ssim"] <= 1
    crashed = cells["krea nf4 none 80x48 b1"]
    assert crashed["status"] == "crash" and "SIGABRT" in crashed["error"]
    assert cells["ref bf16 80x48 b1"]["status"] == "ok"  # the run went on after the crash
    assert cells["krea nf4 8GiB 64x64 b1"]["status"] == "skipped" and "CUDA" in cells["krea nf4 8GiB 64x64 b1"][
        "error"]
    assert cells["anchor nf4_group_leaf_stream 64x64 b1"]["status"] == "skipped"
    assert cells["anchor bf16_resident 64x64 b1"]["status"] == "ok"
    for suffix in (".md", "-vram.png", "-budget.png", "-tokens.png"):
        assert out.with_name(out.stem + suffix).stat().st_size > 0
    assert bench.SYNTHETIC_LABEL in out.with_suffix(".md").read_text()

    # --resume: every measured (and crashed) cell is kept; a child started for one would abort.
    monkeypatch.setenv(bench.ABORT_ENV, " ")  # every matrix cell id holds a space ("env" does not)
    assert bench.run(_args(*argv, "--resume")) == 0
    again = {c["id"]: c for c in json.loads(out.read_text())["cells"]}
    assert {k: c["status"] for k, c in again.items()} == {k: c["status"] for k, c in cells.items()}
    assert again["krea nf4 none 64x64 b1"]["metrics"] == m


def test_fidelity_checks_streamed_steps_against_the_resident_cell(tmp_path):
    doc = _doc()
    same, other = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(same, np.arange(6.0))
    np.save(other, np.arange(6.0) + 1e-6)
    for c, path in zip(doc["cells"][:3], (same, same, other), strict=True):
        c["metrics"]["step_npy"] = str(path)
    bench.add_fidelity(doc)
    assert "step_equals_resident" not in doc["cells"][0].get("fidelity", {})  # the resident cell itself
    assert doc["cells"][1]["fidelity"]["step_equals_resident"] is True
    assert doc["cells"][2]["fidelity"]["step_equals_resident"] is False


@pytest.mark.parametrize("steps", [1, 2, 28])
def test_e2e_peaks_split_encode_steps_and_decode(tmp_path, monkeypatch, steps):
    import torch

    from krea_lite.bench import cells

    log = []
    monkeypatch.setattr(cells, "_peaks", lambda dev, m, prefix: (log.append(prefix), m.update({
        f"{prefix}peak_alloc_gib": float(len(log)), f"{prefix}peak_reserved_gib": float(len(log))})))

    class Pipe:  # what _e2e needs of a FluxPipeline: encode, then one transformer call per step, then decode
        transformer = torch.nn.Linear(2, 2)

        def set_progress_bar_config(self, **_):
            pass

        def __call__(self, num_inference_steps, callback_on_step_end, **_):
            log.append("encode")
            for i in range(num_inference_steps):
                self.transformer(torch.zeros(1, 2))
                callback_on_step_end(self, i, 0, {"latents": torch.zeros(1, 2)})
            log.append("decode")
            return type("Out", (), {"images": []})()

    cell = {"prompt": "p", "batch": 1, "e2e_steps": steps, "guidance": 4.5, "width": 64, "height": 64, "seed": 0,
            "scratch": str(tmp_path), "key": "k"}
    result = {"metrics": {}}
    cells._e2e(Pipe(), cell, torch.device("cpu"), result, lambda: None)
    assert log == ["encode", "e2e_encode_", "e2e_denoise_", "decode", "e2e_decode_"]
    m = result["metrics"]
    phases = [m[f"e2e_{p}_peak_alloc_gib"] for p in ("encode", "denoise", "decode")]
    assert m["e2e_peak_alloc_gib"] == max(phases) == 5.0  # the decode's, recorded 5th in the log
    assert not Pipe.transformer._forward_pre_hooks  # the one-shot hook is gone


def test_ratio_summary_flags_spreads_wider_than_the_margin():
    from krea_lite.bench.cells import ratio_summary

    runs = {"None": [{"round": r, "s_per_step": 1.0} for r in range(3)],
            "8": [{"round": r, "s_per_step": v} for r, v in enumerate((1.01, 1.02, 1.03))],
            "4": [{"round": r, "s_per_step": v} for r, v in enumerate((1.0, 1.08, 1.2))]}
    out = ratio_summary(runs, [8, 4])
    assert out["8"]["ratio_median"] == 1.02 and out["8"]["met"] and not out["8"]["spread_wider_than_margin"]
    assert (out["4"]["ratio_min"], out["4"]["ratio_max"]) == (1.0, 1.2)
    assert out["4"]["met"] and out["4"]["spread_wider_than_margin"]  # 0.2 spread > 0.02 margin


def test_ratio_cell_interleaves_placements_in_one_process(quantized, tmp_path):
    from krea_lite.bench.cells import _cell_ratio

    # bf16: bitsandbytes' CPU NF4 kernels differ bit-wise between its AVX512 and plain paths; the GPU tier checks nf4
    cell = dict(id="ratio bf16", kind="ratio", name="bf16", model=str(quantized("bf16")), device="cpu", budgets=[8, 4],
                rounds=3, width=64, height=64, batch=1, steps=2, warmup=1, text_tokens=8, image_tokens=16,
                scratch=str(tmp_path), key="r")
    result = {"metrics": {}}
    _cell_ratio(cell, result, lambda: None)
    runs = result["metrics"]["runs"]
    assert [len(runs[k]) for k in ("None", "8", "4")] == [3, 3, 3]
    assert [r["round"] for r in runs["8"]] == [0, 1, 2]
    r = result["metrics"]["ratios"]
    assert r["resident_s_per_step"] > 0 and r["8"]["rounds"] == 3 and "target" not in r["4"]  # targets: nf4's
    from krea_lite.bench.cells import LIMIT_TARGETS, RATIO_TARGETS, ratio_targets

    assert ratio_targets({"name": "nf4"}) == (RATIO_TARGETS, "ratio")
    assert ratio_targets({"name": "fp8mm", "compile": True}) == (LIMIT_TARGETS, "vs_physical_limit")
    assert ratio_targets({"name": "nf4", "loras": 3}) == ({}, "")
    assert r["8"]["equals_resident"] and r["4"]["equals_resident"]


def test_ratio_cell_with_loras_measures_each_card_with_and_without_them(quantized, tmp_path):
    from krea_lite.bench.cells import _cell_ratio

    cell = dict(id="ratio bf16 lora", kind="ratio", name="bf16", model=str(quantized("bf16")), device="cpu",
                budgets=[8], rounds=3, width=64, height=64, batch=1, steps=1, warmup=1, text_tokens=8,
                image_tokens=16, loras=3, lora_rank=4, lora_fused=True, lora_dir=str(tmp_path / "loras"), key="r")
    result = {"metrics": {}}
    _cell_ratio(cell, result, lambda: None)
    m = result["metrics"]
    assert sorted(m["runs"]) == sorted(f"{c}{v}" for c in ("None", "8") for v in
                                       ("", "+lora1", "+lora3", "+lora1fused", "+lora3fused"))
    assert len(list((tmp_path / "loras").glob("*-r4-*.safetensors"))) == 3 and len(m["loras"]) == 3
    for v in ("lora+lora1", "lora+lora3", "lora+lora3fused"):
        assert m["ratios"][v]["None"]["rounds"] == 3 and m["ratios"][v]["8"]["ratio_median"] > 0
    assert all(r["equals_resident"] for r in m["runs"]["8+lora3"][1:])  # streamed == resident with LoRAs too
    assert all(r["equals_resident"] for r in m["runs"]["8+lora3fused"][1:])
    sw = m["lora_switch"]  # load and switch times of the cell's LoRAs and of two rank-8 ones, resident and capped
    assert set(sw["None"]) == set(sw["8"]) == {f"rank{r}_{w}_s" for r in (8, 4) for w in ("load", "switch")}
    assert all(v > 0 for v in sw["8"].values()) and len(sw["files_mb"]) == 4


def test_ratio_cell_against_another_scheme_takes_turns_in_the_same_process(quantized, tmp_path):
    from krea_lite.bench.cells import _cell_ratio
    from krea_lite.bench.report import ratio_table

    cell = dict(id="ratio bf16 vs qint8", kind="ratio", name="bf16", model=str(quantized("bf16")), device="cpu",
                budgets=[8], rounds=3, width=64, height=64, batch=1, steps=1, warmup=1, text_tokens=8,
                image_tokens=16, against={"qint8": str(quantized("qint8"))}, key="r")
    result = {"metrics": {}}
    _cell_ratio(cell, result, lambda: None)
    m = result["metrics"]
    assert sorted(m["runs"]) == ["8", "8@qint8", "None", "None@qint8"]
    assert [r["round"] for r in m["runs"]["8@qint8"]] == [0, 1, 2]
    vs = m["ratios"]["vs@qint8"]
    assert vs["8"]["rounds"] == 3 and vs["None"]["ratio_median"] > 0 and vs["target"] is None
    assert m["ratios@qint8"]["8"]["equals_resident"]  # the other scheme streamed == its own resident step
    doc = {"cells": [dict(cell, status="ok", metrics=m)]}
    assert "| bf16 64x64 | qint8 | 8 GiB |" in ratio_table(doc)


def test_profile_summary_splits_stream_busy_and_idle_time():
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ev = [("kernel", "gemm", 0, 40), ("kernel", "gemm", 30, 20), ("kernel", "norm", 80, 20),  # busy 0-50, 80-100
          ("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 40, 30), ("gpu_memcpy", "Memcpy DtoD", 0, 100)]
    trace = {"traceEvents": [{"ph": "X", "cat": c, "name": n, "ts": t, "dur": d} for c, n, t, d in ev]}
    got = module.summarize(trace, steps=1, wall_s=0.2)
    assert got["compute_busy_ms_per_step"] == 0.07 and got["copy_busy_ms_per_step"] == 0.03  # µs -> ms
    assert got["overlap_ms_per_step"] == 0.01 and got["compute_idle_while_copying_ms_per_step"] == 0.02
    assert got["both_idle_ms_per_step"] == 0.01 and got["gpu_span_ms_per_step"] == 0.1  # 70-80 nothing runs
    assert list(got["top_kernels_ms_per_step"]) == ["gemm", "norm"] and got["wall_ms_per_step"] == 200


def test_against_needs_the_other_folder(tmp_path, capsys):
    from krea_lite.bench import main

    assert main(["--models", f"bf16={tmp_path}", "--schemes", "bf16", "--interleave", "3", "--budgets", "none", "8",
                 "--against", "nf4", "--out", str(tmp_path / "b.json")]) == 2
    assert "--against nf4: no nf4 folder; give it as --models nf4=DIR" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_ratio_summary_physical_limit_says_copy_or_compute_bound():
    from krea_lite.bench.cells import ratio_summary

    gib = 2**30
    runs = {"None": [{"round": 0, "s_per_step": 0.1}],
            "8": [{"round": 0, "s_per_step": 0.12, "copied_gib_per_step": 1.0}],
            "4": [{"round": 0, "s_per_step": 0.3, "copied_gib_per_step": 5.0}]}
    out = ratio_summary(runs, [8, 4], h2d_gbps=5 * gib / 0.25 / 1e9)  # 5 GiB in 0.25 s
    assert out["8"]["bound"] == "compute" and out["8"]["physical_limit_s"] == 0.1
    assert out["4"]["bound"] == "copy" and abs(out["4"]["physical_limit_s"] - 0.25) < 1e-4
    assert abs(out["4"]["vs_physical_limit"] - 1.2) < 1e-3


def test_e2e_steps_zero_and_negative(tmp_path):
    from krea_lite.bench.cells import _e2e

    m = {}
    _e2e(None, {"e2e_steps": 0}, None, {"metrics": m}, lambda: None)  # returns before touching the pipeline
    assert m == {}
    with pytest.raises(bench.KreaLiteError if hasattr(bench, "KreaLiteError") else Exception, match="e2e-steps"):
        bench.run(_args("--models", f"nf4={tmp_path}", "--e2e-steps", "-1", "--out", str(tmp_path / "x.json")))
