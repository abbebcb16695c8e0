"""Parameter, memory and time cost of tuning methods: one training step, measured per method.

The paper's efficiency tables compare, for one detector and input, each tuning method's trainable
backbone parameters, peak training memory and time per step. This package measures them; it is the
engine of ``tools/benchmark_tuning.py`` and nothing else builds on it (the synthetic batch it feeds is
:mod:`e3va.synthetic`'s, its memory readings :mod:`e3va.engine.memory`'s, its files written by
:mod:`e3va.atomic`).

* :mod:`.settings`: :class:`BenchmarkSettings`, what every method of one benchmark shares, and the record
  of a method (:data:`RECORD_FIELDS`, :func:`failed_record`);
* :mod:`.measure`: :func:`measure_method` builds the detector of a LazyConfig with its backbone's
  ``tuning`` (``model.backbone.bottom_up.tuning``, or ``model.backbone.net.tuning`` on ViT) set to one
  method and times ``W + N`` training steps (Detectron2's ``SimpleTrainer`` order: forward, ``zero_grad``,
  backward, AdamW step over the trainable parameters) on one seeded synthetic batch. The weights every
  method shares with ``fixed`` are ``fixed``'s (:func:`build_with_shared_weights`), so the heads start
  alike and their cost does not differ by method. Its docstring says how peak memory is measured;
* :mod:`.runner`: :func:`run_method_isolated` runs it in a fresh Python process (``python -m
  e3va.benchmark``, :mod:`.__main__`), because a process's allocator caches and high-water marks would
  otherwise leak from one method into the next; :func:`run_benchmark` does that for every method, and a
  failing method gives a ``"failed: ..."`` record instead of stopping the others. With ``rounds > 1`` it
  measures every method once per round, interleaved (each round in a rotated order), and
  :func:`merge_rounds` reports per method the median over rounds: a host whose speed drifts over minutes
  then slows every method alike, and a step-time ratio is taken between methods of the same round
  (:func:`paired_time_ratios`);
* :mod:`.report`: :func:`write_results_json`, :func:`format_markdown_table` / :func:`write_markdown` and
  :func:`plot_results` write ``results.json``, a paper-style table and a bar chart.
"""
from .measure import SHARED_WEIGHTS_REFERENCE, build_with_shared_weights, describe_device, measure_method
from .report import format_markdown_table, load_note, plot_results, summary_line, write_markdown, write_results_json
from .runner import (
    MALLOC_MMAP_THRESHOLD,
    merge_rounds,
    paired_time_ratios,
    round_order,
    run_benchmark,
    run_method_isolated,
    worker_environment,
)
from .settings import RECORD_FIELDS, BenchmarkSettings, failed_record, load_benchmark_config

__all__ = [
    "BenchmarkSettings",
    "MALLOC_MMAP_THRESHOLD",
    "RECORD_FIELDS",
    "SHARED_WEIGHTS_REFERENCE",
    "build_with_shared_weights",
    "describe_device",
    "failed_record",
    "format_markdown_table",
    "load_benchmark_config",
    "load_note",
    "measure_method",
    "merge_rounds",
    "paired_time_ratios",
    "plot_results",
    "round_order",
    "run_benchmark",
    "run_method_isolated",
    "summary_line",
    "worker_environment",
    "write_markdown",
    "write_results_json",
]
