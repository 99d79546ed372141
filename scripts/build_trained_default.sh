#!/usr/bin/env bash
# Rebuild the trained default bundle (models/default) from nothing but this repository: the
# exact commands and seeds that made the committed one. About 1.5 h of demonstrations, 2.5 h of
# training and a few minutes of draft distillation on 2 CPU cores.
#
#   scripts/build_trained_default.sh [OUT]     (default OUT: models/default-rebuilt)
#
# 1. collect-demos: the scripted expert on the 10 libero_spatial tasks x initial states 0-11,
#    in two processes (initial states 0-5 and 6-11, one directory each; 128 px agent view).
# 2. train-policy on images and language (--no-proprio): the 'small' preset (128 px, 64 image
#    tokens, 6.1 M parameters) by behaviour cloning on those demos, seed 0; it fits the action
#    tokenizer on the demos first. Into OUT-vision.
# 3. train-policy --init OUT-vision: the same model given proprioception (the arm joint and
#    gripper finger positions, one prompt position), fine-tuned on the same demos with the same
#    action tokenizer. Into OUT-base (the default until 2026-12-02).
# 4. refit-decoder: the tokenizer's decoder refitted so its fine layers admit a tight certified
#    depth (rsd_core.training.decoder_refit; encoder, quantiser and codes unchanged, so the policy
#    is untouched), on the same demos' actions; the bundle's tokenizer is replaced in place and
#    the manifest records its new file hash. The committed bundle's decoder came from demos
#    collected with --no-images (identical actions: the expert does not look at the camera).
# 5. collect-demos again: initial states 17-46 of the 10 tasks (12-16 stay unseen for the
#    held-out evaluation), two processes (17-31 and 32-46), 4 states at a time so that an
#    interrupted run stays balanced across tasks.
# 6. train-policy --init OUT-base: fine-tuned on all the demos (initial states 0-11 and 17-46),
#    with OUT-base's tokenizer (refitted decoder included, so stage 4 is not repeated), under
#    bfloat16 autocast (1.6x faster on this AMX CPU). Into OUT.
# 7. train-draft --kind v2: the draft, distilled from OUT on the recorded LIBERO observations of
#    initial states 0-7 in data/observations/libero_spatial (states 8-9 stay held out).
# Every stage is resumable: run the script again after an interruption.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/models/default-rebuilt}"
DEMOS="${DEMOS:-$ROOT/demos/libero_spatial}"
"$ROOT/scripts/setup_env.sh"
# shellcheck source=scripts/ros_env.sh
source "$ROOT/scripts/ros_env.sh"
RSD="$ROOT/.venv/bin/rsd"

"$RSD" collect-demos --suite libero_spatial --init-states 0 1 2 3 4 5 --seed 0 \
  --out "$DEMOS/a" --resume &
first=$!
"$RSD" collect-demos --suite libero_spatial --init-states 6 7 8 9 10 11 --seed 0 \
  --out "$DEMOS/b" --resume
wait "$first"

# Stage 2 in two sessions, exactly as the committed bundle was made: a 2400-step cosine schedule
# stopped at step 2000, then continued (--resume) under a 4000-step schedule, which raises the
# learning rate again from ~3e-5 to ~2.5e-4 (a warm restart) and decays it to zero at step 4000.
VISION="$OUT-vision"
TRAIN=("$RSD" train-policy --demos "$DEMOS/a" "$DEMOS/b" --out "$VISION" --preset small --seed 0
  --batch-size 32 --lr 5e-4 --threads 2 --eval-every 400 --save-every 400 --no-proprio
  --no-distill-draft)
if [[ ! -f "$VISION/manifest.json" ]]; then
  last="$(find "$VISION/checkpoint" -maxdepth 1 -name 'step-*' 2>/dev/null | sort | tail -n 1)"
  step=0
  [[ -n "$last" ]] && step=$((10#${last##*step-}))
  if ((step < 2000)); then
    resume=()
    ((step > 0)) && resume=(--resume)
    "${TRAIN[@]}" --steps 2400 --stop-after 2000 "${resume[@]}"
  fi
  "${TRAIN[@]}" --steps 4000 --resume
fi

# Stage 3: proprioception, 4000 steps at a peak learning rate of 3e-4.
BASE="$OUT-base"
resume=()
[[ -d "$BASE/checkpoint" ]] && resume=(--resume)
"$RSD" train-policy --demos "$DEMOS/a" "$DEMOS/b" --out "$BASE" --init "$VISION" \
  --tokenizer "$VISION/action_tokenizer" --seed 0 --batch-size 32 --lr 3e-4 --threads 2 \
  --eval-every 400 --save-every 400 --steps 4000 --no-distill-draft "${resume[@]}"
# Stage 4: certified-depth decoder (once: the manifest's coarse_layers says whether it is done).
coarse="$("$ROOT/.venv/bin/python" -c 'import json, sys
print(json.load(open(sys.argv[1]))["config"].get("coarse_layers", 0))' \
  "$BASE/action_tokenizer/action_tokenizer.json")"
if [[ "$coarse" == 0 ]]; then
  "$RSD" refit-decoder "$BASE" --demos "$DEMOS/a" "$DEMOS/b" --coarse-layers 3 --bound-depth 3 \
    --bound-target 0.016 --bound-weight 0.1 --steps 1500 --seed 0
fi
# Stage 5: more demonstrations, initial states 17-46.
collect() {
  local out=$1 first=$2 last=$3 s e
  for ((s = first; s <= last; s += 4)); do
    e=$((s + 3 < last ? s + 3 : last))
    "$RSD" collect-demos --suite libero_spatial --init-states $(seq "$s" "$e") --seed 0 \
      --out "$out" --resume
  done
}
collect "$DEMOS/c" 17 31 &
first=$!
collect "$DEMOS/d" 32 46
wait "$first"
# Stage 6: fine-tune OUT-base on all the demos, 4000 steps at a peak learning rate of 2e-4.
resume=()
[[ -d "$OUT/checkpoint" ]] && resume=(--resume)
"$RSD" train-policy --demos "$DEMOS/a" "$DEMOS/b" "$DEMOS/c" "$DEMOS/d" --out "$OUT" \
  --init "$BASE" --tokenizer "$BASE/action_tokenizer" --seed 0 --batch-size 32 --lr 2e-4 \
  --threads 2 --eval-every 500 --save-every 250 --steps 4000 --cache-mb 4096 --dtype bfloat16 \
  --no-distill-draft "${resume[@]}"
# Stage 7: the v2 draft (once: draft.json says which kind is there).
if [[ ! -f "$OUT/draft/draft.json" ]] || ! grep -q '"kind": "v2"' "$OUT/draft/draft.json"; then
  OBS="$OUT-observations-0-7"
  "$ROOT/.venv/bin/python" - "$ROOT/data/observations/libero_spatial" "$OBS" <<'PY'
import json, os, sys
source, target = sys.argv[1:]
os.makedirs(target, exist_ok=True)
if not os.path.exists(os.path.join(target, 'images')):
    os.symlink(os.path.join(source, 'images'), os.path.join(target, 'images'))
with open(os.path.join(source, 'index.jsonl')) as f:
    rows = [line for line in f if json.loads(line)['init_state'] <= 7]
with open(os.path.join(target, 'index.jsonl'), 'w') as f:
    f.writelines(rows)
PY
  "$RSD" train-draft --kind v2 --model "$OUT" --observations "$OBS" --seed 0
fi
echo "trained bundle in $OUT (use it with RSD_MODEL_DIR=$OUT, or move it to models/default)"
