#!/usr/bin/env python
"""Trainable parameters, peak training memory and time per step of tuning methods, as the paper's tables.

Each method runs in its own fresh Python process on the same seeded synthetic batch; a method that fails
gets a "failed: ..." row and the others still run. Writes DIR/results.json, DIR/results.md (table) and
DIR/results.png (bar charts); worker logs go to DIR/logs/.

    python tools/benchmark_tuning.py --config-file configs/COCO/mask_rcnn_swin_t_e3va.py \\
        --methods full,fixed,e3va --iters 5 --warmup 2 --input-size 512 --batch-size 2 \\
        --output output/bench [--rounds R] [--device cpu|cuda] [KEY=VALUE ...]

--rounds R measures every method R times, interleaved (round k runs the methods in an order rotated by
k), and reports medians over the rounds; the step-time ratio to `fixed` is then the median of the
per-round ratios, with their range: on a host whose speed drifts, a comparison within a round is fairer.

KEY=VALUE are LazyConfig overrides, e.g. model.backbone.bottom_up.size=nano. Peak memory is, on CUDA,
max_memory_allocated over the steps; on the CPU, the peak resident set over the steps minus the resident
set before the first step (see e3va.benchmark.measure). Exit code: 0 if every method succeeded, 1 otherwise.
"""
import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from e3va import TUNING_METHODS
from e3va.benchmark import (
    BenchmarkSettings,
    load_benchmark_config,
    load_note,
    merge_rounds,
    plot_results,
    run_benchmark,
    summary_line,
    write_markdown,
    write_results_json,
)


def _mmap_threshold(records) -> str:
    """The allocator setting the workers ran with (the caller's environment may override the default)."""
    return next((r["malloc_mmap_threshold"] for r in records if r.get("malloc_mmap_threshold")), "unset")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="LazyConfig .py with an E3VASwin or E3VAViT backbone")
    parser.add_argument("--methods", default=",".join(TUNING_METHODS),
                        help=f"comma-separated, from: {', '.join(TUNING_METHODS)} (default: all)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every method this many times, interleaved; report medians (default 1)")
    parser.add_argument("--input-size", type=int, default=512, help="square image side, pixels")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=0, help="seconds per method; 0 = no limit")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides, KEY=VALUE")
    args = parser.parse_args(argv)

    # Validate before any worker starts: a typo should cost a second, not a model build per method.
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in TUNING_METHODS]
    if unknown or not methods:
        parser.error(f"unknown tuning method(s) {unknown or [args.methods]} in --methods; "
                     f"valid names: {', '.join(TUNING_METHODS)}")
    args.methods = list(dict.fromkeys(methods))  # a repeated name would only measure the same thing twice
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    try:
        args.settings = BenchmarkSettings(
            config_file=args.config_file, overrides=list(args.opts), input_size=args.input_size,
            batch_size=args.batch_size, iters=args.iters, warmup=args.warmup, device=args.device, seed=args.seed,
        )
        load_benchmark_config(args.config_file, args.opts)  # the overrides must apply
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings: BenchmarkSettings = args.settings
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # the caller's allocator setting, which the workers inherit
        command = f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} {command}"
    print(f"Benchmarking {len(args.methods)} method(s) on {settings.config_file}, "
          f"{settings.input_size}x{settings.input_size}, batch {settings.batch_size}, device {settings.device}",
          flush=True)

    def on_record(record):
        print(summary_line(record), flush=True)
        records_so_far.append(record)
        # Partial results survive an interrupted run.
        write_results_json(merge_rounds(records_so_far, order=args.methods), out / "results.json")

    records_so_far = []
    timeout = args.timeout if args.timeout > 0 else None
    records = run_benchmark(args.methods, settings, out / "logs", rounds=args.rounds, timeout=timeout,
                            on_record=on_record)

    device = next((r["device"] for r in records if r.get("device")), settings.device)
    meta = {
        "Config": settings.config_file + (f" ({' '.join(settings.overrides)})" if settings.overrides else ""),
        "Input": f"{settings.input_size}×{settings.input_size}, batch {settings.batch_size}, "
                 f"{settings.instances_per_image} instances/image (synthetic, seed {settings.seed})",
        "Device": device,
        "Iterations": f"{settings.iters} timed (median) after {settings.warmup} warm-up; "
                      "forward + backward + AdamW step over trainable params"
                      + (f"; {args.rounds} interleaved rounds, each method's median over them, time vs fixed "
                         "as the median (range) of the per-round ratios" if args.rounds > 1 else ""),
        "Peak memory": "CUDA max_memory_allocated" if settings.device.startswith("cuda")
                       else "peak RSS over the steps minus RSS before the first step "
                            f"(MALLOC_MMAP_THRESHOLD_={_mmap_threshold(records)})",
        "Torch": torch.__version__,
        "Command": command,
    }
    note = load_note(records)
    if note:
        meta = {**{k: v for k, v in meta.items() if k != "Command"}, "Load average (1 min)": note,
                "Command": command}
    write_results_json(records, out / "results.json")
    write_markdown(records, out / "results.md", meta)
    plot_results(records, out / "results.png",
                 title=f"{Path(settings.config_file).name}, {settings.input_size}², batch {settings.batch_size}, {device}")
    print(f"Wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    failed = [r["method"] for r in records if r.get("status") != "ok"]
    if failed:
        print(f"Failed: {', '.join(failed)} (logs in {out / 'logs'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
