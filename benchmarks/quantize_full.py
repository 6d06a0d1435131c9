"""Quantize a full-size synthetic FLUX pipeline with the real CLI and record time and host memory.

Runs `krea-lite quantize` as a child process and polls its RssAnon (anonymous resident memory:
what the conversion itself holds; file pages the kernel can drop are not counted) and VmRSS.

    python benchmarks/quantize_full.py --source /tmp/flux-full --out-root /tmp/q --schemes nf4 int8 \
        --json benchmarks/results/quantize-full.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_one(source: str, out: Path, scheme: str) -> dict:
    cmd = [sys.executable, "-m", "krea_lite.cli", "quantize", source, "--out", str(out), "--force", "--quiet",
           "--transformer", scheme, "--text-encoder", scheme]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        peak_anon = max(peak_anon, _status_kib(proc.pid, "RssAnon"))
        peak_rss = max(peak_rss, _status_kib(proc.pid, "VmRSS"))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    output = proc.stdout.read()
    row = {"scheme": scheme, "returncode": proc.returncode, "seconds": round(seconds, 1),
           "peak_rss_anon_gib": round(peak_anon / 2**20, 3), "peak_vmrss_gib": round(peak_rss / 2**20, 3),
           "output_tail": output[-2000:]}
    if proc.returncode == 0:
        manifest = json.loads((out / "krea_lite.json").read_text())
        row["components"] = {c: {"scheme": v["scheme"], "source_bytes": v["source_bytes"], "bytes": v["bytes"]}
                             for c, v in manifest["components"].items()}
        row["folder_bytes"] = sum(f["size"] for f in manifest["files"].values())
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    ap.add_argument("--out-root", required=True)
    ap.add_argument("--schemes", nargs="+", default=["nf4"])
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    import torch

    rows = []
    for scheme in args.schemes:
        row = run_one(args.source, Path(args.out_root) / f"full-{scheme}", scheme)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "output_tail"}), flush=True)
        if row["returncode"]:
            print(row["output_tail"], flush=True)
    result = {
        "what": "krea-lite quantize of the full-size synthetic FLUX pipeline (random weights)",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
