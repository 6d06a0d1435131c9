"""Remove each wait, event and sync of the streaming engine in turn; the GPU tests must fail for each.

    python scripts/mutations.py [--tests tests/test_streaming_gpu.py] [--only NAME ...]

For every mutation, a copy of src/ with that one line removed runs the GPU tier's streaming tests in a
child (PYTHONPATH pointing at the copy). A mutation that passes every test is a gap in the tests.
Prints one line per mutation and a JSON summary; exit 1 when a mutation survived. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = "krea_lite/streaming.py"
# name -> the exact text removed (replaced by `pass` at the same indentation)
MUTATIONS = {
    "compute waits for the copy": "compute.wait_event(self.copied[k])",
    "copy waits for the compute": "self.stream.wait_event(self.computed[k])  # the last compute that read slot k is done",
    "copy records its event": "self.copied[k].record(self.stream)",
    "compute records its event": "self.computed[k].record(torch.cuda.current_stream(self.device))",
    "new slots wait for earlier compute": "self.stream.wait_stream(torch.cuda.current_stream(self.device))",
    "release waits for pending copies": "        self._sync()\n        self.slots, self.slot_views, self.holds",
}


def mutate(src: Path, text: str) -> None:
    path = src / ENGINE
    code = path.read_text()
    if code.count(text) != 1:
        raise SystemExit(f"mutation text not found exactly once in {ENGINE}: {text!r}")
    if text.startswith("        self._sync()\n"):
        code = code.replace(text, text.replace("self._sync()", "pass", 1))
    else:
        code = code.replace(text, "pass  # mutated")
    path.write_text(code)


def run(tests: str, pythonpath: Path) -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=f"{pythonpath}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "gpu and not budget",
                        "-k", "delayed or equals_resident or t5", tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    return p.returncode == 0, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", default="tests/test_streaming_gpu.py")
    ap.add_argument("--only", nargs="*", choices=list(MUTATIONS))
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", base)
        ok, last = run(args.tests, base)
        print(f"unmutated: {'pass' if ok else 'FAIL'} ({last})", flush=True)
        if not ok:
            return 2
        for name in args.only or MUTATIONS:
            copy = Path(tmp) / name.replace(" ", "_")
            shutil.copytree(ROOT / "src", copy)
            mutate(copy, MUTATIONS[name])
            passed, last = run(args.tests, copy)
            results[name] = "SURVIVED (tests passed)" if passed else "caught"
            print(f"{name}: {results[name]} ({last})", flush=True)
    print(json.dumps(results))
    return 1 if any(v.startswith("SURVIVED") for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
