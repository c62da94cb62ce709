#!/usr/bin/env bash
# The cross-tokenizer study of issue 17 in miniature (reports/cross_tokenizer_*.md), on this machine:
#
#   1. SmolLM2-135M's stored logits -> Qwen2 students with GPT-2's tokenizer (qwen2_small), on the top half of
#      1,024 scored instances (refined/xfam; reference: a 100-step LM on D_ref):
#        cross_family      the refined text, LM only (its text export re-packed in GPT-2 tokens)
#        cross_family_rows the refined rows re-tokenized, LM only (cross_family_kd with alpha 0: the same rows)
#        cross_family_kd   the same rows, + KD from the SmolLM2 store through the byte alignment
#   2. Gemma-3-270M as teacher, pretrained SmolLM2-135M as the reference of ANOTHER tokenizer
#      (select.normalize=bytes), students with SmolLM2's tokenizer (llama_small) (refined/gemma_xref):
#        cross_family / cross_family_random   the refined vs a random half's text, LM only (MiniPLM's comparison)
#        cross_family_rows                    the refined rows re-tokenized, LM only (as in 1)
#        cross_family_kd                      the refined rows + KD from the Gemma store
# Every student: 120 steps x 4 rows, seeds 0 and 1, then the whole val split in bits per byte, per source.
# Needs `make data models` and `make models TEACHER=gemma3-270m`. Stages that are done are reused on a rerun;
# STUDY_PARTS="2" runs only the Gemma part.
set -eo pipefail
PY=${PY:-.venv/bin/python}
CACHE=${RD_CACHE:-.cache}
STEPS=${STUDY_STEPS:-120}
PARTS=${STUDY_PARTS:-1 2}
RUNS=runs/xtok
T0=$(date +%s)
say() { echo "== study: $* ($(( $(date +%s) - T0 )) s)"; }
train() {   # train DIR ARGS...: a Hydra multirun, two jobs side by side, one thread each
    local dir=$1
    shift
    "$PY" -m distill.train --multirun hydra/launcher=joblib hydra.launcher.n_jobs=2 hydra.sweep.dir="$dir" \
        'hydra.sweep.subdir=${run_name}-seed${seed}' seed=0,1 trainer.max_steps="$STEPS" trainer.threads=1 \
        trainer.progress=false "$@"
}
evaluate() {   # the whole val split of every run under DIR, two at a time
    local run n=0
    for run in "$1"/*/; do
        [ -f "$run/eval.json" ] && continue
        OMP_NUM_THREADS=1 "$PY" -m distill.evaluate "$run" --tasks '' > /dev/null &
        if (( ++n % 2 == 0 )); then wait; fi
    done
    wait
}

part() { [[ " $PARTS " == *" $1 "* ]]; }

if part 1; then
say "1. SmolLM2 store: reference + refine"
[ -f runs/xfam/reference/summary.json ] || "$PY" -m distill.train +experiment=reference paths.runs=runs/xfam \
    trainer.max_steps=100 trainer.progress=false
"$PY" -m refine name=xfam reference.path=runs/xfam/reference pack.max_instances=1024
XFAM='paths.refined=${paths.cache}/refined/xfam'
say "1. students"
train $RUNS/smollm2/train +experiment=cross_family,cross_family_kd "$XFAM"
train $RUNS/smollm2/train +experiment=cross_family_kd "$XFAM" kd.alpha.peak=0 run_name=cross_family_rows
evaluate $RUNS/smollm2/train
"$PY" -m distill.report $RUNS/smollm2/train --name cross_tokenizer_smollm2 --refined "$CACHE/refined/xfam" \
    --baseline cross_family --notes reports/notes/cross_tokenizer_smollm2.md
fi

if part 2; then
say "2. Gemma teacher, SmolLM2 reference: refine"
"$PY" -m refine paths=gemma name=gemma_xref reference.path="$CACHE/models/smollm2-135m" select.normalize=bytes \
    pack.max_instances=1024
"$PY" bench/xtok_stats.py --refined "$CACHE/refined/gemma_xref" --teacher "$CACHE/models/gemma3-270m" \
    --student "$CACHE/models/smollm2-135m" --out xtok_stats_gemma.json
GEMMA=(paths=gemma 'paths.refined=${paths.cache}/refined/gemma_xref' model=llama_small
       'model.tokenizer=${paths.cache}/models/smollm2-135m')
say "2. students"
train $RUNS/gemma/train +experiment=cross_family,cross_family_random,cross_family_kd "${GEMMA[@]}"
train $RUNS/gemma/train +experiment=cross_family_kd "${GEMMA[@]}" kd.alpha.peak=0 run_name=cross_family_rows
evaluate $RUNS/gemma/train
"$PY" -m distill.report $RUNS/gemma/train --name cross_tokenizer_gemma --refined "$CACHE/refined/gemma_xref" \
    --baseline cross_family_random --notes reports/notes/cross_tokenizer_gemma.md
fi
say "done"
