"""Regenerate README.md's results section from the latest committed `krea-lite bench` JSON.

    python scripts/render_readme.py                    # newest committed benchmarks/results/*.json
    python scripts/render_readme.py --json benchmarks/results/bench-X.json --check

Only the text between `<!-- bench:start -->` and `<!-- bench:end -->` is replaced: the card and date,
the table, the plots (the PNGs beside the JSON) and one sentence per budget on what dominates a
streamed step. The output depends on the JSON alone, so running it twice changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _bench():
    try:
        from krea_lite import bench
    except ImportError:  # run from a checkout without PYTHONPATH=src
        sys.path.insert(0, str(ROOT / "src"))
        from krea_lite import bench
    return bench


def latest_json(results: Path) -> Path:
    """The committed result JSON (in `results` itself, not its log folders) with the newest `krea-lite bench`
    run date (any JSON there when git has none)."""
    try:
        out = subprocess.run(["git", "ls-files", "--", "*.json"], cwd=results, capture_output=True, text=True,
                             timeout=30)
        files = [results / f for f in out.stdout.split()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        files = []
    files = [f for f in files if f.exists() and f.parent == results] or sorted(results.glob("*.json"))
    files = [f for f in files if json.loads(f.read_text()).get("tool") == "krea-lite bench"] or files
    if not files:
        raise SystemExit(f"error: no benchmark JSON in {results}; run `krea-lite bench --out {results}/NAME.json`")
    return max(files, key=lambda f: (json.loads(f.read_text()).get("date", ""), f.name))


def render(readme: str, doc: dict, json_path: Path, readme_path: Path) -> str:
    """README text with the marked section replaced; SystemExit with a message if the markers are wrong."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise SystemExit(f"error: {readme_path} needs exactly one '{START}' followed by one '{END}' "
                         "around the results section")
    prefix = Path(os.path.relpath(json_path.resolve().with_suffix(""), readme_path.resolve().parent)).as_posix()
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{_bench().render_section(doc, prefix)}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="result JSON (default: the newest committed one)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is not up to date")
    args = parser.parse_args(argv)
    if not args.readme.exists():
        raise SystemExit(f"error: {args.readme} does not exist")
    path = args.json or latest_json(args.results)
    text = args.readme.read_text()
    new = render(text, json.loads(path.read_text()), path, args.readme)
    if args.check:
        if new != text:
            print(f"{args.readme} is out of date with {path}: run scripts/render_readme.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
    print(f"{args.readme}: results section from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
