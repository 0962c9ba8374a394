#!/usr/bin/env bash
# Small-scale CPU look at the levers of the defaults (issue 23), on the held-out split only: the embedded default
# (all-MiniLM-L6-v2 on the shipped SST-2 sample, 240 steps) with a tenth of the training sample held out, one seed,
# each lever once; the later runs reuse the first run's teacher (fine-tuned on the same training part). A hint for the
# GPU runs of benchmarks/glue_defaults.py, not a result: one seed, 240 steps, 3,600 training examples.
#   bash benchmarks/glue_defaults_cpu.sh OUT_DIR    (then: python benchmarks/glue_defaults.py collect --out OUT_DIR ...)
set -eu
OUT=${1:?usage: glue_defaults_cpu.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH=src HF_HUB_OFFLINE=1
COMMON="--validation_holdout_fraction 0.1 --seed 42 --overwrite_output_dir true --disable_tqdm true"
run() {  # name, flags... (a run whose results.json exists is kept)
  local name=$1; shift
  [ -e "$OUT/$name/results.json" ] && return
  echo "python recipes/distill_glue.py recipes/configs/sst2_minilm_cpu.yaml $COMMON --output_dir $OUT/$name $*" >> "$OUT/run_commands.txt"
  python recipes/distill_glue.py recipes/configs/sst2_minilm_cpu.yaml $COMMON --output_dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? $(grep -h 'after each stage\|held-out' "$OUT/$name.log" | tr '\n' ' ')"
}
run sst2_defaults_seed42
TEACHER="--model_name_or_path $OUT/sst2_defaults_seed42/teacher --finetune_teacher_epochs 0"
run sst2_recalibrate_seed42 $TEACHER --recalibrate_sigma true
run sst2_aug_all_seed42 $TEACHER --distill_augment all
run sst2_clip2_seed42 $TEACHER --ste_clip 2.0
run sst2_ste_lr_low_seed42 $TEACHER --ste_learning_rate 1e-5
run sst2_attn_w10_seed42 $TEACHER --attention_loss_weight 10
