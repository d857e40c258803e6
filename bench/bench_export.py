"""``buffer export``: streaming every dead letter vs loading them into a list first, same run.

    .venv/bin/python bench/bench_export.py [--dir DIR] [--rows N]

Fills a buffer with N dead letters (~300-byte events), then exports them as JSON lines to
/dev/null twice, each in a fresh subprocess so peak memory is its own:

- baseline: ``SqliteBuffer.dead_letters(limit=N)`` (one list of every row, then written), which
  is what the old export did up to its 1,000-row default;
- streaming: ``iter_dead_letters`` + ``export_rows`` (what ``buffer export`` does now).

It prints rows/s and the peak RSS of each (``ru_maxrss``). This is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from buffer.base import NewEvent, Settlement  # noqa: E402
from buffer.sqlite import SqliteBuffer  # noqa: E402


def fill(path: Path, rows: int) -> None:
    buf = SqliteBuffer(path, 2**40)
    buf.open(["erp"])
    pad = "x" * 200
    try:
        for start in range(0, rows, 5000):
            n = min(5000, rows - start)
            buf.append([NewEvent(id=f"e{i}", key="m1", type="plantedge.scrap.recorded",
                                 time="2026-01-01T00:00:00.000Z",
                                 payload=json.dumps({"id": f"e{i}", "data": {"pad": pad}}))
                        for i in range(start, start + n)], {})
            leased = buf.lease("erp", n)
            buf.settle("erp", Settlement(dead={r.seq: (422, "refused") for r in leased}))
    finally:
        buf.close()


def run_one(path: Path, mode: str, rows: int) -> None:
    from agent.buffer_export import export_rows, letter_doc
    from agent.cli_conventions import Progress

    buf = SqliteBuffer.attach(path)
    started = time.perf_counter()
    with open("/dev/null", "w", encoding="utf-8") as out:
        if mode == "baseline":
            letters = buf.dead_letters(None, rows)
            for d in letters:
                out.write(json.dumps(letter_doc(d)) + "\n")
            n = len(letters)
        else:
            total, it = buf.iter_dead_letters()
            n = export_rows(it, out, "jsonl", Progress("x", total))
    took = time.perf_counter() - started
    buf.close()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "rows": n, "seconds": round(took, 3),
                      "rows_per_s": round(n / took), "peak_rss_mib": round(peak_mib, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_one(Path(args.child[0]), args.child[1], args.rows)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "buffer.db"
        fill(path, args.rows)
        print(f"{args.rows} dead letters, {path.stat().st_size / 2**20:.1f} MiB buffer file")
        for mode in ("baseline", "streaming"):
            done = subprocess.run([sys.executable, __file__, "--rows", str(args.rows),
                                   "--child", str(path), mode], capture_output=True, text=True,
                                  check=True)
            print(done.stdout.strip())


if __name__ == "__main__":
    main()
