#!/usr/bin/env bash
# The GPU-machine session that produced benchmarks/results/glue.json (issue 7). Two device calls, the second right
# after the first (the runs go on between them in a process started with setsid):
#   bash benchmarks/glue_gpu_session.sh start   # starts the runs, waits up to ~9.5 minutes
#   bash benchmarks/glue_gpu_session.sh finish  # waits for the end, collects into $OUT/glue.json (+ logs)
# with .carry/ carried (see `python benchmarks/glue_gpu.py prepare_carry`). The second round (STS-B levers) ran
#   TASKS=stsb ABLATION_TASKS=none LEVERS=stsb:sigma_head,stsb:no_refine,stsb:n64 bash benchmarks/glue_gpu_session.sh start
# and the longer schedule (glue_long.json):
#   MAX_STEPS=12000 TASKS=stsb,mrpc ABLATION_TASKS=none LEVERS=stsb:seed43 JSON=glue_long.json bash ... start|finish
# and the levers beyond the paper (glue_levers2.json, then glue_levers3.json):
#   TASKS=stsb,mrpc ABLATION_TASKS=none JSON=glue_levers2.json LEVERS=stsb:extra_pairs,stsb:no_dropout,stsb:attn_w10,\
#     stsb:lr2e-5,stsb:h64,stsb:h64+extra_pairs,stsb:seed43,mrpc:extra_pairs,mrpc:h64 bash ... start|finish
#   TASKS=stsb,mrpc,sst2 ABLATION_TASKS=none JSON=glue_levers3.json LEVERS=stsb:extra_pairs+no_dropout,\
#     stsb:extra_pairs+no_dropout+seed43,stsb:extra_pairs+no_dropout+seed44,stsb:extra_pairs+seed43,\
#     mrpc:extra_pairs+seed43,mrpc:extra_pairs+no_dropout,mrpc:extra_pairs+no_dropout+seed43,sst2:no_dropout bash ...
#   (the glue_levers3 round ran on the machine the glue_levers2 round had left warm, before `start` moved an earlier
#   round aside: its lever runs read the glue_levers2 round's saved teachers, the same seed-42 fine-tuning its own HAD
#   runs redid, with the same teacher metrics; collect then ran by hand after a finish that waited too little)
# and the augmentations (glue_levers4.json, then glue_levers5.json, each on a fresh round: teachers fine-tuned again):
#   TASKS=stsb,mrpc ABLATION_TASKS=none JSON=glue_levers4.json LEVERS=stsb:extra_pairs+no_dropout+aug_swap,\
#     stsb:extra_pairs+no_dropout+aug_swap+seed43,stsb:extra_pairs+no_dropout+aug_swap_cross,\
#     stsb:extra_pairs+no_dropout+aug_swap_cross+seed43,stsb:extra_pairs+no_dropout+aug_all,\
#     stsb:extra_pairs+no_dropout+aug_all+seed43,mrpc:extra_pairs+aug_all,mrpc:extra_pairs+no_dropout+aug_all bash ...
#   TASKS=stsb,mrpc,sst2 ABLATION_TASKS=none JSON=glue_levers5.json LEVERS=stsb:extra_pairs+no_dropout+aug_all+seed44,\
#     stsb:extra_pairs+no_dropout+aug_all+seed45,stsb:extra_pairs+no_dropout+aug_all+seed46,\
#     mrpc:extra_pairs+aug_all+seed43,mrpc:extra_pairs+no_dropout+aug_all+seed43,sst2:aug_drop,sst2:aug_drop+seed43 bash ...
# and the pooled table: python benchmarks/glue_gpu.py summarize benchmarks/results/{glue,glue_stsb_levers,\
#   glue_levers2,glue_levers3,glue_levers4,glue_levers5}.json --json benchmarks/results/glue_summary.json
# and STS-B's augmented recipe at the longer schedule (glue_long_aug.json, a fresh round: teacher fine-tuned again):
#   MAX_STEPS=12000 TASKS=stsb ABLATION_TASKS=none JSON=glue_long_aug.json LEVERS=stsb:extra_pairs+no_dropout+aug_all,\
#     stsb:extra_pairs+no_dropout+aug_all+seed43,stsb:extra_pairs+no_dropout+aug_all+seed44,\
#     stsb:extra_pairs+no_dropout+aug_all+seed45 bash ... start|finish
# pooled with glue_long.json (summarize refuses to mix step counts): python benchmarks/glue_gpu.py summarize \
#   benchmarks/results/glue_long.json benchmarks/results/glue_long_aug.json --json benchmarks/results/glue_long_summary.json
# (the --distill_extra_tasks runs of glue_levers2-5 and glue_long_aug held dev inputs: README, the dagger rows) and,
# with extra inputs that share a sentence with the task's dev or test split left out, on nvidia-h200-x2 (the runs
# spread over both GPUs, 5 each; glue_clean.json, a fresh round: teachers fine-tuned again, same teacher metrics):
#   MAX_STEPS=12000 TASKS=stsb,mrpc ABLATION_TASKS=none JSON=glue_clean.json LEVERS=stsb:extra_pairs+no_dropout+aug_all,\
#     stsb:extra_pairs+no_dropout+aug_all+seed43,stsb:extra_pairs+no_dropout+aug_all+seed44,\
#     stsb:extra_pairs+no_dropout+aug_all+seed45,stsb:no_dropout+aug_all,stsb:no_dropout+aug_all+seed43,\
#     mrpc:extra_pairs+no_dropout+aug_all,mrpc:extra_pairs+no_dropout+aug_all+seed43 bash ... start|finish
# pooled with glue_long.json (the paper's recipe at 12,000 steps): python benchmarks/glue_gpu.py summarize \
#   benchmarks/results/glue_long.json benchmarks/results/glue_clean.json --json benchmarks/results/glue_clean_summary.json
# and the decay factor of c on the paper's recipe (glue_decay.json, one H200, a fresh round; start, then finish, in one
# call), after which glue_summary.json was summarized again with glue_decay.json added to the files above:
#   TASKS=stsb ABLATION_TASKS=none JSON=glue_decay.json LEVERS=stsb:decay0.999,stsb:decay0.9998 bash ... start|finish
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
