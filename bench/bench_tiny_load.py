"""Build time of the tiny random model (`model=tiny_random`), which every test and smoke run starts with.

    python bench/bench_tiny_load.py                    # median of 5 builds; exit status 1 above --limit seconds
    python bench/bench_tiny_load.py --repeats 10 --limit 0.5

Moved out of tests/test_models.py: a sub-second wall-clock bound says something on an idle machine and fails at
random on a shared CPU, so it is a benchmark with a limit, not a test. Run it with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ctt.models.loading import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=float, default=1.0, help="seconds the median build may take")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    load_model(name="tiny", source="tiny_random", dtype=args.dtype)  # warm-up: imports, lazily built tables
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        load_model(name="tiny", source="tiny_random", dtype=args.dtype)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"tiny_random build ({args.dtype}): median {median:.3f} s over {args.repeats} "
          f"(min {min(times):.3f}, max {max(times):.3f}); limit {args.limit:.3f} s")
    return 0 if median < args.limit else 1


if __name__ == "__main__":
    raise SystemExit(main())
