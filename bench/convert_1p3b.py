"""Time `.nemo` -> FT fp16 conversion of a (synthetic) GPT-3 1.3B checkpoint and report wall time and peak memory.

    python bench/convert_1p3b.py [--nemo PATH] [--work-dir DIR] [--keep] [--json-out FILE]

Generates a random `gpt3-1.3b` .nemo (2.6 GB, seed 0) unless `--nemo` names an existing one, then converts it to
`<work-dir>/1-gpu` (TP 1, fp16) in a fresh child process, so that the child's peak RSS is the conversion's alone.
Peak RSS (`ru_maxrss`) counts the pages of the memory-mapped checkpoint the conversion touched, which are clean
page cache the kernel can drop; `peak_anon_rss_mib` (sampled from /proc every 20 ms) is the conversion's own heap.
The work dir (default: a new temp dir) is deleted afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _anon_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def child_convert(nemo: Path, saved_dir: Path) -> dict[str, float]:
    """Runs in the child: convert and measure this process only."""
    from builder.checkpoints import convert

    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _anon_rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    target = convert(nemo, saved_dir, infer_gpu_num=1, weight_data_type="fp16", progress=False)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    return {
        "convert_wall_s": round(wall, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_anon_rss_mib": round(peak_anon[0] / 1024, 1),
        "output_bytes": sum(p.stat().st_size for p in target.iterdir()),
        "output_files": len(list(target.iterdir())),
    }


def run_child(*args: str) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nemo", type=Path, help="existing gpt3-1.3b .nemo (default: generate one in the work dir)")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--json-out", type=Path, help="also write the JSON report here")
    parser.add_argument("--child-convert", nargs=2, metavar=("NEMO", "SAVED_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--child-generate", type=Path, metavar="NEMO", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_convert:
        print(json.dumps(child_convert(Path(args.child_convert[0]), Path(args.child_convert[1]))))
        return
    if args.child_generate:
        from builder.checkpoints import write_synthetic_checkpoint

        start = time.perf_counter()
        write_synthetic_checkpoint("gpt3-1.3b", args.child_generate, seed=0)
        print(json.dumps({"generate_wall_s": round(time.perf_counter() - start, 2)}))
        return

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="convert-1p3b-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                                 "python": platform.python_version()}
    try:
        nemo = args.nemo or work / "gpt3-1.3b.nemo"
        if not nemo.is_file():
            report |= run_child("--child-generate", str(nemo))
        report["nemo_bytes"] = nemo.stat().st_size
        report |= run_child("--child-convert", str(nemo), str(work / "ft"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
