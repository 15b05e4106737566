#!/usr/bin/env bash
# Wall time of the whole `sr1 quickstart` from an empty SR1_HOME (model fetch included),
# printed as one JSON document: {"wall_s", "stage_seconds", "rows", ...}.
#   benchmarks/quickstart.sh                 # the default config (experiments/quickstart.yaml)
#   benchmarks/quickstart.sh --set trainer.max_steps=4   # extra args go to `sr1 quickstart`
#   benchmarks/quickstart.sh --ablations     # also the unmasked-RL row (paired_no_mask)
# SR1_BENCH_HOME keeps the run's stores (default: a temp dir, removed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
SR1=${SR1:-.venv/bin/sr1}
home=${SR1_BENCH_HOME:-$(mktemp -d)}
mkdir -p "$home"
[ -n "${SR1_BENCH_HOME:-}" ] || trap 'rm -rf "$home"' EXIT
start=$(date +%s.%N)
SR1_HOME="$home" "$SR1" quickstart --fresh --json "$@" > "$home/quickstart.json"
end=$(date +%s.%N)
.venv/bin/python - "$home/quickstart.json" "$start" "$end" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))
out = {
    "wall_s": round(float(sys.argv[3]) - float(sys.argv[2]), 1),
    "stage_seconds": res["seconds"],
    "rows": [{k: r[k] for k in ("model", "method", "ablation", "n", "em", "cover_em",
                                "em_single_hop", "em_two_hop", "searches_per_question",
                                "searches_single_hop", "searches_two_hop")} for r in res["rows"]],
    "paired": res["paired"],
    "train_run": res["train_run"],
}
if "paired_no_mask" in res:  # --ablations
    out["paired_no_mask"] = res["paired_no_mask"]
print(json.dumps(out, indent=2))
PY
