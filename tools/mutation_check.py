#!/usr/bin/env python
"""Hand-written mutation testing of the method and checkpoint code; the report is docs/MUTATION.md.

mutmut is not installed in the project's environment (and the development machine has no network), so
this tool applies a fixed list of mutants instead: each one a source text replacement in ``projects/E3VA``
that breaks one equation or one guarantee the README states. One at a time, it copies the package to a
temporary folder, applies the mutant there (the working tree is never touched), and runs the few tests
chosen to catch it with ``PYTHONPATH`` pointing at the copy. The mutant is *killed* when they fail.

Usage (from the repository root; about 30 s to a minute per mutant on 2 CPU cores)::

    python tools/mutation_check.py --out docs/MUTATION.md    # every mutant; `make mutation-hand`
    python tools/mutation_check.py --only taps_swapped losa_state_not_carried

Not part of the test suite (tests/tools/test_mutation_check.py only checks that every mutant still
applies to the current source).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "projects" / "E3VA"  # holds the `e3va` package: what PYTHONPATH names

_REF = "tests/methods/test_reference.py::"
REF_SWIN_E3VA = _REF + "test_swin_e3va_equals_its_equations"
REF_VIT_E3VA = _REF + "test_vit_e3va_equals_its_equations"
REF_SWIN_LOSA = _REF + "test_swin_losa_equals_its_recurrence"
REF_VIT_LOSA = _REF + "test_vit_losa_equals_its_recurrence"


class Mutant(NamedTuple):  # not a dataclass: tests load this script without registering it in sys.modules
    """``old`` replaced by ``new`` in ``path`` (relative to projects/E3VA); ``old`` must occur exactly once,
    so that the list fails loudly, rather than mutating nothing, when the source changes."""

    name: str
    path: str
    old: str
    new: str
    tests: Tuple[str, ...]  # pytest ids, run from the repository root
    breaks: str  # what the change breaks, for the report
    equivalent: str = ""  # why no test can kill it (it changes no observable behaviour), when that is so


MUTANTS: Tuple[Mutant, ...] = (
    # ---- the five changes issue 21 found unguarded, in today's layout
    Mutant("crossing_removed", "e3va/swin.py",
           "return y, packed, self._recomputed(merge, y, packed if frozen else None, params) - tokens",
           "return y, packed, None",
           (REF_SWIN_E3VA, REF_SWIN_LOSA), "the side state no longer crosses the patch merging"),
    Mutant("mlp_tap_on_block", "e3va/methods/e3va.py",
           "block.norm2.register_forward_pre_hook(self._feed_input(beside_mlp, first=False))",
           "block.register_forward_pre_hook(self._feed_input(beside_mlp, first=False))",
           ("tests/methods/test_e3va.py::test_adapters_read_the_sublayer_outputs_or_inputs_on_swin[sublayer_input]",),
           "sublayer_input: M_j reads x_{j-1} instead of h_j"),
    Mutant("trunk_dtype_ignored", "e3va/backbone.py",
           "low_precision = self.trunk_dtype is not torch.float32", "low_precision = False",
           ("tests/test_swin.py::test_bfloat16_trunk_computes_in_bfloat16_and_the_side_network_in_float32",),
           "trunk_dtype=bfloat16 runs the trunk in fp32"),
    Mutant("side_autocast_removed", "e3va/methods/base.py",
           "with grad, torch.autocast(x.device.type, enabled=False):", "with grad:",
           ("tests/test_swin.py::test_bfloat16_trunk_computes_in_bfloat16_and_the_side_network_in_float32",
            "tests/methods/test_losa.py::test_bfloat16_trunk_keeps_the_side_network_in_fp32"),
           "side networks run under the trunk's bf16 autocast"),
    Mutant("eval_only_loads_nothing", "e3va/engine/training.py",
           "        load_weights(build_checkpointer(model), cfg)", "        pass",
           ("tests/engine/test_training.py::test_main_trains_then_evaluates_from_a_config_file",),
           "--eval-only evaluates untrained weights"),
    # ---- E3VA's equations
    Mutant("highway_sum_sign", "e3va/methods/e3va.py",
           "else self.carried + self.total", "else self.carried - self.total",
           (REF_SWIN_E3VA,), "d_end = d_start - sum instead of + sum"),
    Mutant("taps_swapped", "e3va/methods/e3va.py",
           "self._run(beside_attn if first else beside_mlp, output, first)",
           "self._run(beside_mlp if first else beside_attn, output, first)",
           (REF_SWIN_E3VA,), "A_j reads F2, M_j reads F1"),
    Mutant("stacked_parallel_swapped", "e3va/methods/e3va.py",
           'self.stacked = highway.spec.arrangement == "stacked"',
           'self.stacked = highway.spec.arrangement != "stacked"',
           (REF_SWIN_E3VA, "tests/methods/test_e3va.py::test_stacked_and_parallel_differ_once_perturbed"),
           "parallel adapters run stacked and stacked ones parallel"),
    Mutant("dual_branches_crossed", "e3va/methods/e3va.py",
           "self.v.reshape(-1, self.in_features)", "self.v.flip(0).reshape(-1, self.in_features)",
           (REF_SWIN_E3VA,), "fused path computes U1 V2 + U2 V1"),
    Mutant("u_up_gradient_sign", "e3va/methods/e3va.py",
           "g.t() @ s,  # u_up", "-(g.t() @ s),  # u_up",
           ("tests/methods/test_e3va.py::test_gradcheck_of_the_fused_adapter_function_in_float64_with_fp32_storage",),
           "the fused backward's gradient of U_up has the wrong sign"),
    Mutant("output_norm_skipped", "e3va/swin.py",
           "out = self._recomputed(norm, y, packed, [p for p in norm.parameters() if p.requires_grad])",
           "out = y", (REF_SWIN_E3VA,), "p_s = x_end + d_end without norm_s"),
    Mutant("downsample_modes_swapped", "e3va/swin.py",
           'if self.highway_downsample == "direct":', 'if self.highway_downsample != "direct":',
           ("tests/methods/test_e3va.py::test_direct_downsampling_starts_off_zero_and_difference_at_zero",),
           '"difference" crosses as PM(d), "direct" as PM(x + d) - PM(x)'),
    Mutant("vit_side_output_dropped", "e3va/vit.py",
           "features = features + self._taps.end().permute(0, 3, 1, 2)", "self._taps.end()",
           (REF_VIT_E3VA,), "the ViT backbone returns x_L, not x_L + d_L"),
    # ---- LoSA's recurrence
    Mutant("losa_token_residual_dropped", "e3va/methods/losa.py",
           "return t + self.channel_mlp(z + t)", "return t + self.channel_mlp(t)",
           (REF_VIT_LOSA,), "u = T(z) instead of z + T(z)"),
    Mutant("losa_state_not_carried", "e3va/methods/losa.py",
           "return g if state is None else state + g", "return g",
           (REF_VIT_LOSA,), "a_l = g_l(b_l + a_{l-1}), dropping a_{l-1}"),
    Mutant("losa_pads_top_left", "e3va/methods/losa.py",
           "(0, 0, 0, pad_r, 0, pad_b)", "(0, 0, pad_r, 0, pad_b, 0)",
           (REF_VIT_LOSA, "tests/methods/test_losa.py::test_windows_are_padded_and_cropped_like_swin"),
           "windows padded top/left, then cropped as if bottom/right"),
    # ---- what the side networks keep for backward, and the frozen trunk
    Mutant("fp8_scale_dropped", "e3va/side_memory.py",
           "return x if scale is None else x * scale.to(dtype)", "return x",
           ("tests/test_swin.py::test_compact_input_round_trip",
            "tests/test_swin.py::test_fused_side_networks_match_the_plain_graph[float8_e4m3fn-0.1-e3va-40]"),
           "fp8 saved inputs come back without their per-token scale"),
    Mutant("saved_dtype_ignored", "e3va/side_memory.py",
           "return x.to(self.dtype), None", "return x, None",
           ("tests/test_swin.py::test_fused_adapters_keep_less_for_backward",
            "tests/methods/test_losa.py::test_trunk_runs_without_autograd_and_little_is_kept_for_backward"),
           "bf16 saved inputs are kept in fp32 (memory only)"),
    Mutant("trunk_under_autograd", "e3va/backbone.py",
           "stack.enter_context(torch.enable_grad() if needs_grad else torch.no_grad())",
           "stack.enter_context(torch.enable_grad())",
           ("tests/test_swin.py::test_frozen_trunk_runs_without_autograd[e3va]",),
           "a frozen trunk runs with autograd enabled",
           equivalent="autograd records an operation only when an input requires grad; in a frozen trunk no "
                      "parameter does, the image does not, and the side network never feeds back into the "
                      "trunk, so no graph is built either way"),
    Mutant("trunk_never_under_autograd", "e3va/backbone.py",
           "needs_grad = self.trunk_needs_autograd", "needs_grad = False",
           ("tests/test_swin.py::test_full_finetuning_does_run_the_trunk_under_autograd",),
           "a trunk that trains runs without autograd (no gradient reaches it)"),
    # ---- checkpoints: writing, trainable-only files, --eval-only
    Mutant("trainable_checkpoint_ignored", "e3va/engine/training.py",
           "        checkpointer.load(task)", "        pass",
           ("tests/engine/test_training.py::test_eval_only_evaluates_the_trainable_checkpoint_on_its_base",),
           "train.trainable_checkpoint is not loaded"),
    Mutant("save_not_atomic", "e3va/checkpoint.py",
           "atomic_torch_save(data, save_file)", "torch.save(data, save_file)",
           ("tests/test_robustness.py::test_a_save_killed_midway_keeps_the_previous_checkpoint[trainable_only_periodic]",),
           "a save killed midway leaves a truncated checkpoint"),
    Mutant("trainable_buffers_dropped", "e3va/trainable.py",
           "for name, b in module.named_buffers(recurse=False):", "for name, b in []:",
           ("tests/test_trainable.py::test_frozen_random_factors_travel_with_the_trainable_file",),
           "trainable-only files lose e3va_fa's frozen random factors"),
    Mutant("fingerprint_ignores_values", "e3va/trainable.py",
           'digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")', "pass",
           ("tests/test_trainable.py::test_base_fingerprint_sees_frozen_weights_only",),
           "the base fingerprint sees shapes, not weights"),
    Mutant("trainable_check_skipped", "e3va/trainable.py",
           "    check_trainable_checkpoint(model, checkpoint, source)\n    target", "    target",
           ("tests/test_trainable.py::test_trainable_only_file_is_refused_by_another_method_base_or_shape",),
           "a trainable-only file is applied to any model"),
)


def apply_mutant(root: Path, mutant: Mutant) -> None:
    """Applies ``mutant`` to the package copy at ``root`` (a folder holding ``e3va``); ValueError unless its
    ``old`` text occurs exactly once there."""
    stale = stale_mutants(root, [mutant])
    if stale:
        raise ValueError(f"Mutant {stale[0]}, not one; update it to the current source.")
    path = root / mutant.path
    path.write_text(path.read_text().replace(mutant.old, mutant.new))


def stale_mutants(root: Path, mutants: Iterable[Mutant]) -> List[str]:
    """``"name: N matches in path"`` for each mutant whose ``old`` text does not occur exactly once under ``root``."""
    counts = ((m, (root / m.path).read_text().count(m.old)) for m in mutants)
    return [f"{m.name}: {n} matches in {m.path}" for m, n in counts if n != 1]


def run_tests(package: Path, tests: Sequence[str], timeout: float) -> Tuple[str, float]:
    """Runs ``tests`` with ``package`` first on PYTHONPATH; ``(outcome, seconds)``, outcome one of
    "passed", "failed" (a test failed or could not import the package), "timeout", "error" (pytest
    found no such test: a stale id, which must not count as a kill)."""
    env = {**os.environ, "PYTHONPATH": str(package), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    seconds = time.monotonic() - start
    # pytest: 0 all passed, 1 some failed, 2 interrupted (e.g. an import error at collection), 4 usage
    # error, 5 nothing collected.
    outcome = {0: "passed", 1: "failed", 2: "failed"}.get(proc.returncode, "error")
    if outcome == "error":
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-2000:])
    return outcome, seconds


def run_mutant(mutant: Optional[Mutant], tests: Sequence[str], timeout: float) -> Tuple[str, float]:
    """``run_tests`` on a fresh copy of the package with ``mutant`` applied (None: unmutated)."""
    with tempfile.TemporaryDirectory(prefix="e3va-mutant-") as tmp:
        root = Path(tmp) / "E3VA"
        shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if mutant is not None:
            apply_mutant(root, mutant)
        return run_tests(root, tests, timeout)


def _unique(items: Iterable[str]) -> List[str]:
    return list(dict.fromkeys(items))


def report(rows: Sequence[Tuple[Mutant, str, float]], command: str) -> str:
    """The Markdown report: kill rate and one table row per mutant."""
    killed = sum(outcome in ("failed", "timeout") for _, outcome, _ in rows)
    survivors = [m.name + (" (equivalent)" if m.equivalent else "") for m, outcome, _ in rows if outcome == "passed"]
    killable = len(rows) - sum(outcome == "passed" and bool(m.equivalent) for m, outcome, _ in rows)
    lines = [
        f"Command: `{command}`", "",
        f"**{killed} of {len(rows)} mutants killed** ({100.0 * killed / max(len(rows), 1):.0f}%; "
        f"{killed} of the {killable} that are not equivalent); survived: {', '.join(survivors) or 'none'}.", "",
        "| mutant | file | breaks | tests run | result | s |", "|---|---|---|---|---|---|",
    ]
    result = {"failed": "killed", "timeout": "killed (timeout)", "passed": "**survived**", "error": "error"}
    for mutant, outcome, seconds in rows:
        tests = "<br>".join(f"`{t.split('::', 1)[-1]}`" for t in mutant.tests)
        verdict = result[outcome] + (f": equivalent, {mutant.equivalent}" if outcome == "passed" and mutant.equivalent
                                     else "")
        lines.append(f"| `{mutant.name}` | `{mutant.path}` | {mutant.breaks} | {tests} | {verdict} | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--out", type=Path, help="write the Markdown table here (between the markers of "
                        "docs/MUTATION.md if the file has them, else the whole file)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the chosen tests")
    args = parser.parse_args(argv)
    by_name: Dict[str, Mutant] = {m.name: m for m in MUTANTS}
    unknown = sorted(set(args.only or ()) - set(by_name))
    if unknown:
        parser.error(f"unknown mutants {unknown}; known: {sorted(by_name)}")
    mutants = [by_name[n] for n in args.only] if args.only else list(MUTANTS)
    stale = stale_mutants(PACKAGE, mutants)  # all of them at once, before any test runs
    if stale:
        parser.error("mutants that no longer apply once to the source: " + "; ".join(stale))
    if not args.no_baseline:
        # A kill means something only if the same tests pass on the unmutated package.
        outcome, seconds = run_mutant(None, _unique(t for m in mutants for t in m.tests), args.timeout * 2)
        print(f"baseline: {outcome} ({seconds:.0f} s)", flush=True)
        if outcome != "passed":
            return 1
    rows = []
    for mutant in mutants:
        outcome, seconds = run_mutant(mutant, mutant.tests, args.timeout)
        print(f"{mutant.name}: {outcome} ({seconds:.0f} s)", flush=True)
        rows.append((mutant, outcome, seconds))
    given = list(sys.argv[1:] if argv is None else argv)
    table = report(rows, " ".join(["python tools/mutation_check.py", *given]))
    print(table)
    if args.out:
        write_report(args.out, table)
    return 0 if all(outcome != "error" for _, outcome, _ in rows) else 1


BEGIN, END = "<!-- mutation_check: begin -->", "<!-- mutation_check: end -->"


def write_report(path: Path, table: str) -> None:
    """Puts ``table`` between the markers of ``path`` (keeping the prose around them), or writes it whole."""
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = f"{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}"
    else:
        text = f"# Mutation testing\n\n{BEGIN}\n{table}{END}\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
