"""The benchmark's worker process: ``python -m e3va.benchmark --method M --settings JSON --result-file PATH``
(started by :func:`e3va.benchmark.runner.run_method_isolated`)."""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from ..atomic import atomic_write_json
from .measure import measure_method
from .report import summary_line
from .settings import BenchmarkSettings, failed_record, record_ok


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    """Measures one method and writes its record (``status`` ``"failed: ..."`` and exit code 1 on an
    exception)."""
    parser = argparse.ArgumentParser(description="Benchmark worker: measures one tuning method.")
    parser.add_argument("--method", required=True)
    parser.add_argument("--settings", required=True, help="BenchmarkSettings as JSON")
    parser.add_argument("--result-file", required=True)
    args = parser.parse_args(argv)
    settings = BenchmarkSettings.from_json(args.settings)
    try:
        record = measure_method(args.method, settings)
        code = 0 if record_ok(record) else 1
    except BaseException as e:  # MemoryError and KeyboardInterrupt too: the parent wants a reason
        traceback.print_exc()
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        record = failed_record(args.method, settings, reason)
        code = 1
    atomic_write_json(record, Path(args.result_file))
    print(summary_line(record), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(worker_main())
