#!/usr/bin/env bash
# make demo: the main job end to end on a slice, then the question it exists for, answered on this machine:
# does distilling from the stored teacher logits beat plain LM training at equal tokens on the same instances?
#
#   data + teacher (fetched) -> reference LM on D_ref -> refine a slice (teacher + reference passes, stored
#   top-p-k logits) -> lm_baseline and kd_wsd side by side on the scored instances (same seed, same steps)
#   -> the whole val split scored for each -> reports/demo.md (table, val curves PNG, the KD-vs-LM line).
#
# Everything lands in its own places (runs/demo/, $RD_CACHE/refined/demo/, reports/demo.*), so it never touches
# `make reference` / `make refine`'s outputs. Run again after a crash: the trainer resumes and finished stages
# are seconds (refine re-scores only a changed slice). Settings come from the Makefile (DEMO_*).
set -eo pipefail

PY=${PY:?} CACHE=${CACHE:?}
RUNS=runs/demo
START=$(date +%s)
stage() {   # stage NAME CMD...: run it, then say how long it took
    local name=$1 t0
    shift
    t0=$(date +%s)
    echo "== demo: $name"
    "$@"
    echo "== demo: $name took $(( $(date +%s) - t0 )) s"
}

stage "data + teacher" make --no-print-directory data models
stage "reference LM (${DEMO_REF_STEPS} steps on D_ref)" \
    "$PY" -m distill.train +experiment=reference paths.runs=$RUNS trainer.max_steps="$DEMO_REF_STEPS" \
    trainer.progress=false
stage "refine ${DEMO_INSTANCES} instances" \
    "$PY" -m refine name=demo reference.path=$RUNS/reference pack.max_instances="$DEMO_INSTANCES"
# Two jobs side by side, one thread each: 1.5x the throughput of one two-thread job on 2 cores (make sweep).
# Ten validations per run, so the report's val curves are curves (the trainer's default, every 50, gave two).
stage "lm_baseline and kd_wsd, ${DEMO_STEPS} steps each" \
    "$PY" -m distill.train --multirun hydra/launcher=joblib hydra.launcher.n_jobs=2 \
    hydra.sweep.dir=$RUNS/train 'hydra.sweep.subdir=${run_name}' +experiment=lm_baseline,kd_wsd \
    'paths.refined=${paths.cache}/refined/demo' 'data.train=${paths.refined}/instances_scored' \
    trainer.max_steps="$DEMO_STEPS" trainer.threads=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 )) \
    trainer.eval_every=$(( DEMO_STEPS / 10 > 0 ? DEMO_STEPS / 10 : 1 )) trainer.progress=false
evaluate_all() {   # side by side as the training, a core each
    local pids=() run
    for run in "$RUNS"/train/*/; do OMP_NUM_THREADS=1 "$PY" -m distill.evaluate "$run" --tasks '' & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid"; done
}
stage "eval (whole val split)" evaluate_all
stage "report" "$PY" -m distill.report $RUNS/train --name demo --baseline lm_baseline --refined "$CACHE/refined/demo"
echo
grep -h "^- Did" reports/demo.md
echo "demo: report reports/demo.md; wall time $(( $(date +%s) - START )) s"
