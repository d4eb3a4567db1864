#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: installs the CUDA build of jax into .venv, runs the quick benchmark suite
# and 2 minutes of Koch et al.'s config, and writes benchmarks/results/<gpu>.json (run.py's file, e.g.
# gpu-nvidia-h100-80gb-hbm3-x1.json, with the Koch run's figures added under "koch_training"). About 8
# minutes in all. Without a GPU it stops at once and says so. Untested on a GPU so far (benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; OMNIGLOT_DIR as for run.py
#
# Environment: KOCH_MINUTES (default 2), PYTHON (the interpreter that makes .venv if it is missing,
# default python3.11), SIAMESE_TORCH_PYTHON (a Python with torch: run.py's PyTorch peer, on the GPU too).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "gpu_check: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 || fail "no nvidia-smi on PATH: this script needs an NVIDIA GPU and its driver"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) || true
[ -n "$gpu" ] || fail "nvidia-smi lists no GPU (driver not loaded, or no device visible to this process)"
echo "gpu_check: $gpu"

started=$SECONDS
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3.11}" -m venv .venv
fi
# The README's command for an NVIDIA GPU: the project at the pinned versions, with the CUDA 12 jaxlib plugin.
.venv/bin/pip install -q -c constraints.txt -e '.[test]' 'jax[cuda12]' \
  || fail "pip could not install jax[cuda12] (it needs PyPI, or a wheel folder in PIP_FIND_LINKS)"
backend=$(.venv/bin/python -c 'import jax; print(jax.default_backend())')
[ "$backend" = gpu ] || fail "jax[cuda12] installed, but JAX runs on '$backend', not the GPU (CUDA driver too old?)"
echo "gpu_check: installed in $((SECONDS - started)) s; JAX on $backend"

run_log=$(mktemp)
workdir=$(mktemp -d)
trap 'rm -rf "$workdir" "$run_log"' EXIT
.venv/bin/python benchmarks/run.py --quick 2>&1 | tee "$run_log"
written=$(sed -n 's/.*; wrote \(.*\.json\)$/\1/p' "$run_log" | tail -n 1)
[ -n "$written" ] && [ -f "$written" ] || fail "benchmarks/run.py --quick wrote no results file"

# The same data as run.py: $OMNIGLOT_DIR or ../shared/data/omniglot, never a download; else the synthetic source.
omniglot=$(.venv/bin/python -c 'import sys; sys.path.insert(0, "benchmarks"); import cases; print(cases.find_omniglot_dir() or "")')
koch_args=(--config=configs/omniglot_koch.py --workdir="$workdir/koch" --config.data.download=False
           --config.train.time_limit_minutes="${KOCH_MINUTES:-2}")
if [ -n "$omniglot" ]; then
  koch_args+=(--config.data.data_dir="$omniglot")
else
  echo "gpu_check: no Omniglot found: Koch's config trains on the synthetic source (same shapes)"
  koch_args+=(--config.data.source=synthetic --config.data.synthetic_classes=200 --config.eval.lake_runs=False)
fi
koch_started=$SECONDS
.venv/bin/python launch.py "${koch_args[@]}" 2>&1 | tail -n 20
koch_seconds=$((SECONDS - koch_started))

# The Koch run's figures beside run.py's: steps done and their rate (training time only, saves included),
# from the workdir's results.json.
.venv/bin/python - "$written" "$workdir/koch" "$koch_seconds" "$gpu" <<'EOF'
import json, pathlib, sys
written, workdir, seconds, gpu = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
results = json.loads(written.read_text())
koch = {"config": "configs/omniglot_koch.py", "gpu": gpu, "wall_seconds": seconds}
found = workdir / "results.json"
if found.exists():
  report = json.loads(found.read_text())
  koch["results"] = report
  if report.get("step") and report.get("training_seconds"):
    koch["steps_per_s"] = report["step"] / report["training_seconds"]
    koch["pairs_per_s"] = koch["steps_per_s"] * 128  # configs/omniglot_koch.py's batch
    print(f"gpu_check: Koch, {report['step']} steps in {report['training_seconds']:.0f} s: "
          f"{koch['pairs_per_s']:.0f} pairs/s")
results["koch_training"] = koch
written.write_text(json.dumps(results, indent=2) + "\n")
print(f"gpu_check: wrote {written} (with koch_training)")
EOF
echo "gpu_check: done in $((SECONDS - started)) s"
