#!/usr/bin/env bash
# A GLUE round on the GPU machine, in two device calls, the second right after the first (the runs go on between
# them in a process started with setsid):
#   bash benchmarks/glue_gpu_session.sh start   # starts the runs, waits up to ~9.5 minutes
#   bash benchmarks/glue_gpu_session.sh finish  # waits for the end, collects into $OUT/$JSON (+ logs)
# with .carry/ carried (see `python benchmarks/glue_gpu.py prepare_carry`). The environment chooses the round:
# MAX_STEPS (default 5000), TASKS, ABLATION_TASKS, LEVERS (see `glue_gpu.py --help`) and JSON (the results file).
# The commands of the rounds behind benchmarks/results/glue*.json are listed in benchmarks/README.md.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
RUN=/tmp/glue_runs
wait_done() {  # $1: seconds at most
  local end=$((SECONDS + $1))
  while [ ! -e $RUN.done ] && [ $SECONDS -lt $end ]; do sleep 10; done
  grep -h "started\|exit" $RUN.log | tail -30
  for f in $RUN/*.log; do echo "$(basename $f): $(tail -c 160 $f | tr "\n" " ")"; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}
case "$1" in
start)
  if [ -e $RUN ] || [ -e $RUN.done ]; then  # a warm machine keeps an earlier round: move it aside, never mix them
    aside=$RUN.$(date +%H%M%S); mkdir -p $aside && mv $RUN $RUN.log $RUN.done $aside/ 2>/dev/null; echo "earlier round moved to $aside"
  fi
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
  setsid bash -c "python benchmarks/glue_gpu.py run --glue_dir .carry/glue --teacher .carry/minilm --out $RUN \
    --max_steps ${MAX_STEPS:-5000} --eval_steps 500 --learning_rate 5e-5 --refinement_learning_rate 5e-6 \
    --tasks ${TASKS:-sst2,mrpc,stsb,rte} --ablation_tasks ${ABLATION_TASKS:-sst2,stsb} \
    --levers ${LEVERS:-stsb:refine_attn,stsb:clip2,stsb:lr1e-4,sst2:refine_attn} > $RUN.log 2>&1; touch $RUN.done" &
  sleep 5
  wait_done 555
  ;;
finish)
  wait_done 570
  if [ -e $RUN.done ]; then
    python benchmarks/glue_gpu.py collect --out $RUN --json $OUT/${JSON:-glue.json} --gpu "$(nvidia-smi --query-gpu=name --format=csv,noheader)"
    tar czf $OUT/glue_logs.tgz -C $RUN --exclude='*/teacher' --exclude='*.safetensors' --exclude='*.bin' .
  else
    echo "NOT DONE"
  fi
  ;;
esac
