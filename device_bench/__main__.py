"""``python -m device_bench BUNDLE``: benchmark a bundle's model files on this device.

Imports numpy and the chosen runtime only. Each model file is measured in a fresh process so
that its memory figures are its own; a crash there is that row's failure, the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import children
from .document import result_document, table
from .errors import describe_os_error
from .files import json_text, new_file_problem, write_json
from .formats import FILE_PRECISIONS, FORMATS
from .manifest import BundleError, read_bundle
from .runtimes import ORT_MEMORY, RUNTIMES


def run_child(bundle: Path, file: str, settings: dict) -> dict:
    """Measure one file in a fresh process (``device_bench.bench``); its last stdout line is the row."""
    proc = children.run([sys.executable, "-m", "device_bench.bench", str(bundle), file, json.dumps(settings)])
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated positive integers, e.g. 1,8")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other mistake here
        self.exit(2, f"error: {message} (see 'python -m device_bench --help')\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m device_bench", description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--format", default=",".join(FORMATS), help="comma-separated formats to measure (default: all)")
    p.add_argument("--precision", default=",".join(FILE_PRECISIONS), help="comma-separated precisions (default: all in the bundle)")
    p.add_argument("--runtime", choices=list(RUNTIMES), default=None, help="force one runtime")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    p.add_argument("--ort-memory", choices=list(ORT_MEMORY), default="default", help="ONNX Runtime session memory: lean = no arena, no memory pattern (less RSS, some latency)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=None, help="timed runs per batch size (default 50)")
    p.add_argument("--min-seconds", type=float, default=None, help="time each batch size for this long instead of --runs")
    p.add_argument("--batch", type=_ints, default=[1], help="batch sizes, e.g. 1,8")
    p.add_argument("--gallery", type=_ints, default=[1000, 10000, 100000], help="gallery sizes for 1:N search")
    p.add_argument("--json", default=None, help="write the full result here ('-': to standard output, instead of the table)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json")
    p.add_argument("--quiet", action="store_true", help="no progress and no table (a failed row is still said in one line)")
    args = p.parse_args(argv)
    if args.json not in (None, "-"):
        args.json = Path(args.json)
        problem = new_file_problem(args.json, args.force)
        if problem:
            p.error(problem)
    if args.runs is not None and args.runs < 1:
        p.error(f"--runs {args.runs}: use at least 1")
    if args.runs is not None and args.min_seconds is not None:
        p.error("use --runs or --min-seconds, not both")
    if args.min_seconds is not None and not 0 < args.min_seconds < 86400:
        p.error(f"--min-seconds {args.min_seconds}: use a positive number of seconds, under a day")
    if args.min_seconds is None and args.runs is None:
        args.runs = 50
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--warmup must be >= 0 and --threads >= 1")
    return args


def select_files(bundle, formats: list[str], precisions: list[str]) -> list[dict]:
    for f in formats:
        if f not in FORMATS:
            raise BundleError(f"unknown format {f!r}: choose from {', '.join(FORMATS)}")
    have = {(e["format"], e["precision"]) for e in bundle.files}
    for p in precisions:
        if p not in FILE_PRECISIONS:
            raise BundleError(f"unknown precision {p!r}: choose from {', '.join(FILE_PRECISIONS)}")
    chosen = [e for e in bundle.files if e["format"] in formats and e["precision"] in precisions]
    if not chosen:
        listed = ", ".join(f"{f} {p}" for f, p in sorted(have))
        raise BundleError(f"the bundle has no {'/'.join(formats)} file at {'/'.join(precisions)} (it has: {listed}): export it first")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = {
        "runtime": args.runtime,
        "threads": args.threads,
        "ort_memory": args.ort_memory,
        "batch": args.batch,
        "warmup": args.warmup,
        "runs": args.runs,
        "min_seconds": args.min_seconds,
        "gallery": args.gallery,
    }
    try:
        bundle = read_bundle(args.bundle)
        files = select_files(bundle, args.format.split(","), args.precision.split(","))
        if args.runtime:
            files = [e for e in files if args.runtime in FORMATS[e["format"]].runtimes]
            if not files:
                raise BundleError(f"runtime {args.runtime} runs none of the chosen files: choose --format to match")
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    rows, started = [], time.perf_counter()
    for i, entry in enumerate(files):
        if not args.quiet:
            elapsed = time.perf_counter() - started
            eta = f", about {elapsed / i * (len(files) - i):.0f} s left" if i else ""
            print(f"[{i + 1}/{len(files)}] {entry['path']} ({elapsed:.0f} s{eta})", file=sys.stderr, flush=True)
        row = run_child(args.bundle, entry["path"], settings)
        row.setdefault("file", entry["path"])
        row.setdefault("format", entry["format"])
        row.setdefault("precision", entry["precision"])
        row.setdefault("size_bytes", entry["size_bytes"])
        rows.append(row)
    target = {"name": os.environ.get("DEVICE_BENCH_TARGET", "local"), "emulated": bool(os.environ.get("DEVICE_BENCH_EMULATED"))}
    result = result_document(target, bundle, settings, rows)
    try:
        if args.json == "-":
            sys.stdout.write(json_text(result))
        elif args.json:
            write_json(args.json, result)
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    if not args.quiet and args.json != "-":
        print(table(result))
    failed = [r for r in rows if r["status"] != "verified"]
    if failed:  # said even with --quiet: the exit status alone would not say which file
        print(f"error: {len(failed)} of {len(rows)} rows not verified; first: {failed[0]['file']}: {failed[0]['status']}: {failed[0]['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
