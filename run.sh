#!/usr/bin/env bash
# bash run.sh [ARGS...]     set up .venv if needed, run the tiny experiment (ARGS go to reminder.py)
# bash run.sh test [slow]   same set-up, then the tests (`slow`: the slow tier; CI runs both)
# bash run.sh bench         same set-up, then the speed benchmark (test_reminder.py, beside the tests)
# bash run.sh plan [...]    same set-up, then the memory plan of a real run (no GPU, no download; test_reminder.py)
# bash run.sh gpu-check     same set-up, then the one-GPU check (GPU machines; writes runs/gpu-check/gpu-check.json)
set -euo pipefail
cd "$(dirname "$0")"
export TOKENIZERS_PARALLELISM=false
# The tiny run, the tests and the plan need no model hub: offline, so nothing is looked up. A
# real-scale run (--student ...) reads the hub unless the caller sets HF_HUB_OFFLINE itself.
case " $* " in *" --student "* | *" --student="*) ;; *) export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" ;; esac
PY=.venv/bin/python
# Re-install only when requirements.txt changed since the last install.
if [ ! -x "$PY" ] || ! cmp -s requirements.txt .venv/.requirements.installed; then
  python3 -m venv .venv
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet -r requirements.txt
  cp requirements.txt .venv/.requirements.installed
fi
case "${1:-}" in
  test) shift
    tier="not slow"; if [ "${1:-}" = slow ]; then tier=slow; shift; fi
    exec "$PY" -m pytest -q -o "markers=slow: the slow tier" -m "$tier" test_reminder.py "$@" ;;
  bench) shift; exec "$PY" test_reminder.py --bench "$@" ;;
  plan) shift; exec "$PY" test_reminder.py --plan "$@" ;;
  gpu-check) shift; exec "$PY" test_reminder.py --gpu-check --out runs/gpu-check "$@" ;;
  *) exec "$PY" reminder.py "$@" ;;
esac
