#!/usr/bin/env bash
# GPU check (issue 11 item 8): on ONE CUDA machine with NO Hub access, in <= 8 minutes start-up included,
#   (a) every notebook under nbmake with MARL_PROFILE=tiny on CUDA (notebook 04: 8-bit and 4-bit bases), and
#   (b) `marl bench` on the random-init 124M GPT-2-sized base (batch 128, 16 new tokens, 4 epochs x 4 minibatches),
#       20 PPO steps per runner in fp32 and in bf16: MARL (PPOTrainer) vs separate models vs the compute floor,
# then prints ONE table. It has not run on a GPU yet (docs/gpu.md).
#
# Usage
#   bash scripts/gpu_check.sh --download-wheels   where PyPI is reachable: fill .whl/ (git-ignored, ~150 MB)
#   bash scripts/gpu_check.sh                     on the CUDA machine (with .whl/ copied next to the repo's files)
#   bash scripts/gpu_check.sh --dry-run           anywhere: check what can be checked without CUDA, on the CPU
# Without CUDA the script always does the dry run and says so.
#
# Wheels. The CUDA machine is expected to have Python 3.12 with torch, transformers, peft and accelerate; what
# trl, datasets, bitsandbytes, nbmake, ipykernel (a Jupyter kernel), matplotlib and pandas need beyond those is
# pinned in scripts/gpu_check_wheels.txt and downloaded here, wheels only, for that machine:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl NAME==VERSION        (for each line of the list)
# (manylinux_2_24 because that is bitsandbytes' tag.) There, only the wheels whose distribution is missing are
# installed, with no index and no dependency resolution, into a private folder put first on PYTHONPATH:
#   pip install --no-index --no-deps --target /tmp/gpu_check/site .whl/<missing>.whl ...
#
# Budget of the 480 s (each part is cut by `timeout` and reported as skipped, cut or "not run", never dropped):
#   set-up (wheels, imports, kernel spec) ~30 s; the notebooks <= 240 s (they come first: device bugs are what
#   this check is for); the bench gets the rest, half per precision less start-up (`--time-budget`: fewer than
#   20 steps are then run and reported as such); 20 s for the table.
# Settings: PYTHON (default python3), GPU_CHECK_DIR (default /tmp/gpu_check), GPU_CHECK_BUDGET (default 480 s),
#   GPU_CHECK_NOTEBOOK_BUDGET (default 240 s).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="${GPU_CHECK_DIR:-/tmp/gpu_check}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
NOTEBOOK_BUDGET="${GPU_CHECK_NOTEBOOK_BUDGET:-240}"
WHEELS="$REPO/.whl"
LIST="$REPO/scripts/gpu_check_wheels.txt"
START=$(date +%s)
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --download-wheels) MODE=download ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run | --download-wheels]" >&2; exit 2 ;;
esac

if [ "$MODE" = download ]; then
  mkdir -p "$WHEELS"
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" -r "$LIST"
fi

mkdir -p "$WORK"
STATUS="$WORK/status.tsv"
: > "$STATUS"
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
# record PART RESULT SECONDS DETAIL: one row of the final table
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STATUS"; }

export MARL_PROFILE=tiny HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MARL_OUTPUT_DIR="$WORK/runs" TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export JUPYTER_PATH="$WORK/jupyter/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"

# ---------------------------------------------------------------------------------------------- set-up
t0=$(date +%s)
if [ "$MODE" = run ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: CUDA is missing here (torch.cuda.is_available() is False, or torch is absent): DRY RUN only."
  MODE=dry
fi
[ "$MODE" = dry ] && echo "gpu_check: dry run: checks imports, the wheel set and a 2-step tiny bench on the CPU;" \
  "the notebooks on CUDA and the GPT-2 bench are NOT run."

missing=$("$PYTHON" - "$LIST" "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
from packaging.utils import canonicalize_name, parse_wheel_filename
wheels = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in pathlib.Path(sys.argv[2]).glob("*.whl")}
for line in pathlib.Path(sys.argv[1]).read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
        continue
    name = canonicalize_name(re.split("[=<>!~ ]", line)[0])
    try:
        md.distribution(name)
    except md.PackageNotFoundError:  # missing here: carried as a wheel, or reported
        print(wheels[name] if name in wheels else f"NO-WHEEL:{name}")
EOF
)
no_wheel=$(printf '%s\n' "$missing" | grep '^NO-WHEEL:' | sed 's/NO-WHEEL://' | tr '\n' ' ')
to_install=$(printf '%s\n' "$missing" | grep -v '^NO-WHEEL:' | grep . || true)
if [ -n "$to_install" ]; then
  if [ "$MODE" = dry ]; then
    echo "gpu_check: would install $(printf '%s\n' "$to_install" | wc -l) wheels into $WORK/site (dry run: not done)"
  else
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$WORK/site" $to_install \
      || echo "gpu_check: installing the wheels failed (see above)"
  fi
fi
have=$(ls "$WHEELS"/*.whl 2>/dev/null | wc -l)
want=$(grep -cv '^\s*\(#\|$\)' "$LIST")
imports=$("$PYTHON" - <<'EOF' 2>/dev/null  # library warnings at import go; each failure is caught and named
import importlib, sys
names = ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "nbmake", "ipykernel",
         "matplotlib", "pandas", "marl_utils.bench.command", "marl_utils.ppo.trainer", "marl_utils.display.notebook_helpers"]
bad = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - each failure is reported by name
        bad.append(f"{name} ({type(err).__name__}: {str(err)[:80]})")
import torch
cuda = torch.version.cuda or "none"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {cuda}), {gpu}")
print("import failures: " + "; ".join(bad) if bad else "all imports ok")
EOF
)
echo "gpu_check: $imports"
kernel="no python3 kernel"
if "$PYTHON" -m ipykernel install --prefix "$WORK/jupyter" --name python3 >/dev/null 2>&1; then kernel="python3 kernel ok"; fi
setup_result=ok
case "$imports" in *"import failures"*) setup_result=FAILED ;; esac
[ -n "$no_wheel" ] && setup_result=FAILED
record "set-up: wheels, imports, kernel" "$setup_result" "$(( $(date +%s) - t0 ))" \
  "$(printf '%s' "$imports" | head -1); wheels in .whl: $have/$want; missing without a wheel: ${no_wheel:-none}; $kernel; $(printf '%s' "$imports" | tail -1)"

# ---------------------------------------------------------------------------------------------- (a) notebooks
cd "$REPO" || exit 1
notebooks=$(ls notebooks/[0-9][0-9]_*.ipynb)
if [ "$MODE" = run ]; then
  # the notebooks first (device bugs are what this check is for), then the bench adapts its step count to the rest
  nb_budget=$(( NOTEBOOK_BUDGET < $(left) - 150 ? NOTEBOOK_BUDGET : $(left) - 150 ))
  t=$(date +%s)
  if [ "$nb_budget" -lt 60 ]; then
    for nb in $notebooks; do record "notebook $(basename "$nb" .ipynb) (CUDA)" skipped - "out of time"; done
  else
    # SIGINT at the budget: pytest stops the running notebook and still reports what passed so far
    # shellcheck disable=SC2086
    timeout --signal=INT --kill-after=15 "$nb_budget" "$PYTHON" -m pytest $notebooks --nbmake \
      --nbmake-timeout="$nb_budget" -v -rA -p no:cacheprovider > "$WORK/notebooks.log" 2>&1
    for nb in $notebooks; do
      name=$(basename "$nb" .ipynb)
      if grep -qE "^PASSED $nb" "$WORK/notebooks.log"; then
        record "notebook $name (CUDA)" passed - ""
      elif line=$(grep -m1 -E "^(FAILED|ERROR) $nb" "$WORK/notebooks.log"); then
        record "notebook $name (CUDA)" FAILED - "$(printf '%s' "$line" | cut -c1-160)"
      else
        record "notebook $name (CUDA)" "not run" - "out of time ($nb_budget s for all notebooks)"
      fi
    done
    record "notebooks, all (log: $WORK/notebooks.log)" "-" "$(( $(date +%s) - t ))" ""
  fi
else
  t=$(date +%s)
  # shellcheck disable=SC2086
  if collected=$("$PYTHON" -m pytest $notebooks --nbmake --collect-only -q -p no:cacheprovider 2>&1); then
    record "notebooks: nbmake collects them (dry run)" ok "$(( $(date +%s) - t ))" \
      "$(printf '%s\n' "$collected" | grep -oE '[0-9]+ tests? collected'); not executed: no CUDA"
  else
    record "notebooks: nbmake collects them (dry run)" FAILED "$(( $(date +%s) - t ))" "$(printf '%s' "$collected" | tail -1)"
  fi
fi

# ---------------------------------------------------------------------------------------------- (b) bench
bench() {  # bench PRECISION TIMING_BUDGET_S: up to 20 steps per runner of the gpt2 base on CUDA, timing only
  local precision=$1 budget=$2 out="$WORK/bench-$1" t
  t=$(date +%s)
  if [ "$budget" -lt 30 ]; then
    record "bench gpt2 $precision (CUDA)" skipped - "out of time ($(left) s left)"; return
  fi
  # --time-budget covers loading and the steps; the first run also builds the base (~30 s) before it
  timeout --signal=INT --kill-after=15 $(( budget + 60 )) "$PYTHON" -m marl_utils bench --base-size gpt2 \
    --device cuda --precision "$precision" --steps 20 --timing-only --compare marl,separate \
    --time-budget "$budget" --output-dir "$out" > "$WORK/bench-$precision.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ] && [ -f "$out/bench.json" ]; then
    record "bench gpt2 $precision (CUDA)" ok "$(( $(date +%s) - t ))" "json:$out/bench.json"
  else
    record "bench gpt2 $precision (CUDA)" "FAILED (exit $rc)" "$(( $(date +%s) - t ))" \
      "$(tail -2 "$WORK/bench-$precision.log" | tr '\t\n' '  ' | cut -c1-160)"
  fi
}
if [ "$MODE" = run ]; then
  rest=$(( $(left) - 20 ))          # 20 s for the table
  bench fp32 $(( rest / 2 - 50 ))   # 50 s: process start-up and, once, building the gpt2 base
  bench bf16 $(( $(left) - 20 - 30 ))
else
  t=$(date +%s)
  if timeout 300 "$PYTHON" -m marl_utils bench --base-size tiny --device cpu --steps 2 --timing-only \
      --output-dir "$WORK/bench-dry" > "$WORK/bench-dry.log" 2>&1; then
    record "bench tiny fp32 on CPU (dry run)" ok "$(( $(date +%s) - t ))" "json:$WORK/bench-dry/bench.json"
  else
    record "bench tiny fp32 on CPU (dry run)" FAILED "$(( $(date +%s) - t ))" \
      "$(tail -2 "$WORK/bench-dry.log" | tr '\t\n' '  ' | cut -c1-160)"
  fi
  record "bench gpt2 fp32 + bf16 (CUDA)" skipped - "no CUDA: not run"
fi

# ---------------------------------------------------------------------------------------------- the table
"$PYTHON" "$REPO/scripts/gpu_check_table.py" "$STATUS" "$MODE" "$(elapsed)" "$BUDGET"
