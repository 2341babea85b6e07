"""What device_bench's measuring costs in memory: its child's peak RSS against a bare process.

For each model file of each bundle given, two kinds of fresh process are run side by side,
``--repeats`` times each, interleaved (bare, device_bench, bare, ...):

- ``bare``: python + numpy + the runtime, the model file loaded, ``--runs`` inferences at batch 1
  on a constant input of the model's input shape and dtype, then ``VmHWM`` from ``/proc/self/status``.
  This is the least an app that embeds images with this file needs. (No ``np.random`` and no
  ``json``: numpy 2 imports ``numpy.random`` lazily, and it alone costs a few MB.)
- ``device_bench``: the measured child of ``python -m device_bench`` (``python -m device_bench.bench
  BUNDLE FILE SETTINGS``) with ``--runs`` timed runs at batch 1, no gallery; its row's
  ``memory.peak_rss_mb`` (``VmHWM`` after loading, the golden check, warm-up and timing, before
  ``eval.npz`` and the galleries; see docs/bench-schema.md).

The bare process runs the runtime that device_bench picked for the file (so both load the same
library), with the runtime's default threads in both. Reported: the median of each, their ratio
(target: device_bench within 10% of bare), and the resident memory each starts from (bare: after
``import numpy``; device_bench: its ``baseline_rss_mb``, after numpy and device_bench's imports).

    python benchmarks/device_bench_overhead.py runs/shadow-d8/bundle runs/triplet-d128/bundle
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_bench.manifest import read_bundle  # noqa: E402
from device_bench.files import write_json  # noqa: E402

TARGET_RATIO = 1.10
# The bare process: argv = path, runtime, runs. Prints {"start_mb": ..., "peak_mb": ...}.
BARE = r"""
import sys
import numpy as np

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

start_mb = status_mb("VmRSS")
path, runtime, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
if runtime == "onnxruntime":
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    x = np.full([d if isinstance(d, int) else 1 for d in inp.shape], 0.5, np.float32)
    def run():
        session.run(None, {inp.name: x})
else:
    module = "ai_edge_litert.interpreter" if runtime == "litert" else "tflite_runtime.interpreter"
    Interpreter = __import__(module, fromlist=["Interpreter"]).Interpreter
    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    x = np.full(inp["shape"], 0.5 if np.dtype(inp["dtype"]).kind == "f" else 1, inp["dtype"])
    def run():
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        interpreter.get_tensor(out["index"])
for _ in range(runs):
    run()
print('{"start_mb": %f, "peak_mb": %f}' % (start_mb, status_mb("VmHWM")))
"""


def _last_json_line(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_bench_row(bundle: Path, file: str, runs: int) -> dict:
    settings = {"runtime": None, "threads": None, "batch": [1], "warmup": 5, "runs": runs, "min_seconds": None, "gallery": []}
    row = _last_json_line([sys.executable, "-m", "device_bench.bench", str(bundle), file, json.dumps(settings)])
    if row.get("status") != "verified":
        raise RuntimeError(f"device_bench failed on {bundle}/{file}: {row.get('error')}")
    return row


def bare_run(path: Path, runtime: str, runs: int) -> dict:
    return _last_json_line([sys.executable, "-c", BARE, str(path), runtime, str(runs)])


def measure(bundle_path: Path, repeats: int, runs: int) -> list[dict]:
    bundle = read_bundle(bundle_path)
    results = []
    for entry in bundle.files:
        bare, bench = [], []
        runtime = None
        for _ in range(repeats):
            row = device_bench_row(bundle_path, entry["path"], runs)
            runtime = row["runtime"]
            bench.append(row["memory"])
            bare.append(bare_run(bundle_path / entry["path"], runtime, runs))
        results.append(
            {
                "bundle": f"{bundle.manifest['training']['loss']} d={bundle.manifest['embedding']['dim']}",
                "file": entry["path"],
                "size_bytes": entry["size_bytes"],
                "runtime": runtime,
                "bare_start_mb": statistics.median(b["start_mb"] for b in bare),
                "bare_peak_mb": statistics.median(b["peak_mb"] for b in bare),
                "device_bench_baseline_mb": statistics.median(m["baseline_rss_mb"] for m in bench),
                "device_bench_peak_mb": statistics.median(m["peak_rss_mb"] for m in bench),
                "bare_peaks_mb": [b["peak_mb"] for b in bare],
                "device_bench_peaks_mb": [m["peak_rss_mb"] for m in bench],
            }
        )
    return results


def format_table(results: list[dict]) -> str:
    header = ["bundle", "file", "runtime", "size KB", "bare start MB", "bare peak MB", "device_bench baseline MB", "device_bench peak MB", "ratio", "within 10%"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 4) + ":---:|"]
    for r in results:
        ratio = r["device_bench_peak_mb"] / r["bare_peak_mb"]
        lines.append(
            f"| {r['bundle']} | {r['file']} | {r['runtime']} | {r['size_bytes'] / 1024:.1f} | {r['bare_start_mb']:.1f} | "
            f"{r['bare_peak_mb']:.1f} | {r['device_bench_baseline_mb']:.1f} | {r['device_bench_peak_mb']:.1f} | "
            f"{ratio:.3f} | {'yes' if ratio <= TARGET_RATIO else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", type=Path, nargs="+", help="bundle folders written by 'edge-siamese export'")
    p.add_argument("--repeats", type=int, default=5, help="processes of each kind per file (median)")
    p.add_argument("--runs", type=int, default=50, help="inferences at batch 1 in each process")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    args = p.parse_args(argv)
    if not Path("/proc/self/status").exists():
        sys.exit("device_bench_overhead: needs Linux /proc (VmHWM)")
    results = [r for bundle in args.bundles for r in measure(bundle, args.repeats, args.runs)]
    print(format_table(results))
    if args.json:
        write_json(args.json, {"platform": platform.platform(), "python": platform.python_version(), "repeats": args.repeats, "runs": args.runs, "results": results})


if __name__ == "__main__":
    main()
