#!/usr/bin/env bash
# Runs mutmut over the files of tools/mutmut/setup.cfg, from the staging folder .mutmut/ (docs/MUTATION.md);
# with "methods" first, over those of tools/mutmut/methods/setup.cfg (the side networks' equations), from
# .mutmut-methods/, with its own test selection.
# Usage: tools/mutmut_run.sh [methods]                  run the mutants of PATTERNS below, one worker
#        tools/mutmut_run.sh [methods] summary          the per-module table
#        tools/mutmut_run.sh [methods] ARGS...          any mutmut command (results, show NAME, ...)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
if [ "${1:-}" = methods ]; then
  shift
  STAGE="$REPO/.mutmut-methods" CONFIG="$REPO/tools/mutmut/methods/setup.cfg"
  # Every function of both modules but _register, which runs only when the module is imported: mutmut
  # switches mutants per call, after the import, so its mutants could never be active in a test.
  PATTERNS=('e3va.methods.e3va.xǁ*' 'e3va.methods.e3va.x_attach_highway__*' 'e3va.methods.losa.*')
else
  STAGE="$REPO/.mutmut" CONFIG="$REPO/tools/mutmut/setup.cfg"
  # The side network and the checkpoint-writing functions. checkpoint.py and trainable.py also read and
  # check files; mutmut mutates whole files, but those functions' mutants are not run.
  PATTERNS=('e3va.side_memory.*' 'e3va.atomic.*'
    'e3va.checkpoint.xǁE3VACheckpointerǁ__init____*' 'e3va.checkpoint.xǁE3VACheckpointerǁsave__*'
    'e3va.checkpoint.xǁE3VACheckpointerǁtag_last_checkpoint__*'
    'e3va.checkpoint.xǁE3VACheckpointerǁ_holds_trainable_only__*'
    'e3va.trainable.x__unwrap__*' 'e3va.trainable.x__without_ddp_prefix__*'
    'e3va.trainable.x_trainable_state_dict__*' 'e3va.trainable.x_base_fingerprint__*'
    'e3va.trainable.x_tuning_method_of__*' 'e3va.trainable.x_side_network_of__*'
    'e3va.trainable.x_full_checkpoint__*' 'e3va.trainable.x_holds_side_network__*'
    'e3va.trainable.x_trainable_metadata__*' 'e3va.trainable.x_config_record__*'
    'e3va.trainable.x_trainable_checkpoint__*' 'e3va.trainable.x_save_trainable__*')
fi
# mutants/ must exist before Python starts: a PYTHONPATH entry that does not exist yet is cached as
# "nothing here" and the tests would then import the unmutated package.
mkdir -p "$STAGE/mutants"
# Links, not copies: mutmut copies them into $STAGE/mutants/ itself and mutates only that copy.
for name in tests configs tools; do ln -sfn "../$name" "$STAGE/$name"; done
ln -sfn ../projects/E3VA/e3va "$STAGE/e3va"
cp "$CONFIG" "$STAGE/setup.cfg"
# Subprocesses started by the tests (file_lock, export_trainable) must import the mutated copy too;
# one thread each, since the development machine has 2 cores.
export PYTHONPATH="$STAGE/mutants" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$STAGE"
if [ "$#" -eq 0 ]; then set -- run --max-children 1 "${PATTERNS[@]}"; fi
if [ "$1" = summary ]; then  # the per-module table of docs/MUTATION.md
  "$PYTHON" -m mutmut results --all true | "$PYTHON" "$REPO/tools/mutmut_summary.py" "${PATTERNS[@]}"
  exit
fi
exec "$PYTHON" -m mutmut "$@"
