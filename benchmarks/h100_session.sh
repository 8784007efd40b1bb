# The GPU runs behind BENCHMARKS.md's correctness, distillation-throughput and quality figures, as calls on one
# warm H100 (one call carries at most 64 MiB, the SmolLM2 GGUF is 98 MB, so it travels in two halves, and a
# machine goes back 30 s after a call, so the calls follow each other at once). The working tree travels with every
# call: beside .whl and .gguf1 it has about 5 MB, so results stay out of it until they are trimmed to logs and JSON.
# While the tree changes, `git archive --format=tar.gz HEAD -o .snapshot.tgz` carries the committed tree instead
# (extracted to /tmp/code and run from there; BENCHMARKS.md's tenth session shows the commands):
#   bash benchmarks/h100_session.sh first     # carry .whl .gguf1: wheels, first half, GPU tests (TESTS: a -k
#                                             # expression, or none; TEST_S) and beside them a kernel warm-up for the
#                                             # quality calls (WARM, see warm() below), then distillation speed (RUNS,
#                                             # or RUNS=none); with SERVE (serving_speed.py's arguments) that runs alone
#                                             # on GPU 0 with compile and CUDA-graph logs, the rest on GPU 1
#   bash benchmarks/h100_session.sh solo      # (nvidia-h200, one GPU) carry .whl .gguf1, as first: SERVE, then WARM, then
#                                             # TESTS, then SPEED (as train_speed), then PARTS (prefill_parts.py's arguments), then KDLOSS
#                                             # (kd_loss_speed.py's), then MIXERS (serving_speed.py's --mixers: random
#                                             # students at SmolLM2's shape, before and after as before_after, with
#                                             # BEFORE, SERVING, TRACE; no GGUF needed), each if given, one
#                                             # after another on the one GPU. A script run by hand needs the
#                                             # PYTHONPATH set below (/tmp/site:$PWD), or linearize is not found
#   bash benchmarks/h100_session.sh second    # carry .gguf2 corpus (or corpus.tgz, `tar czf corpus.tgz corpus`): join
#                                             # the GGUF, real-teacher GPU tests (TESTS, or TESTS=none), quality
#                                             # (QUALITY, QUALITY_S)
#   bash benchmarks/h100_session.sh serving   # (after a quality call that trained hybrid_qwen3_5, still warm) export it to
#                                             # qwen3_5, check the export without linearize (export_check.py), bench
#                                             # teacher, student and native model (BENCH, BENCH_S)
#   bash benchmarks/h100_session.sh quality   # (after second, still warm) more quality runs
#   bash benchmarks/h100_session.sh pair      # (nvidia-h200-x2; JOIN=1 to join the GGUF and corpus as second does) two
#                                             # quality runs at once, QUALITY0 (or none) on GPU 0 and QUALITY1 on GPU 1; with
#                                             # SERVE, GPU 0 runs serving_speed.py (as first) and the GPU tests TESTS; BESIDE
#                                             # (a command line, BESIDE_S) runs beside them on GPU 0
#   bash benchmarks/h100_session.sh finish    # (after pair, QUALITY0 and QUALITY1 with --resume) finish both quality
#                                             # runs, then on each GPU export and check a hybrid_qwen3_5 (as serving)
#                                             # or bench any other student beside the teacher (STUDENT_BENCH, BENCH_S)
#   bash benchmarks/h100_session.sh generate  # (after pair trained hybrid_gdn and hybrid_qwen3_5) export, then plain
#                                             # generate() of students, export and teacher (GENERATE), QUALITY1 beside
#   bash benchmarks/h100_session.sh students  # (after solo or first, still warm) carry .gguf2 corpus.tgz: join, then each
#                                             # recipe in STUDENTS distilled as shipped but for STUDENT_TOKENS tokens a
#                                             # stage, uncompiled (speed does not depend on how long it trained), saved
#                                             # in float32 as the recipe saves it, and serving_speed.py of every one
#                                             # beside the GGUF teacher (STUDENT_BENCH, BENCH_S); the recipes distil at
#                                             # once, within DISTILL_S (240: on a cold machine fla's kernels compile
#                                             # in the first step), each over what an earlier call left (--overwrite);
#                                             # AT_ONCE=0 distils them one after another, each within DISTILL_S
#                                             # (STUDENT_BENCH=none: no serving run, for students_serve in a call of its
#                                             # own: seven recipes' distillation and their serving do not fit one call; the
#                                             # last 20 lines of each distillation's log go to $OUT/distill.log)
#   bash benchmarks/h100_session.sh students_serve  # (after students, still warm) serving_speed.py of every saved
#                                             # student beside the GGUF teacher (STUDENT_BENCH, BENCH_S), then
#                                             # decode_dispatches.py on CUDA (HOST: its --recipes, or none; HOST_S),
#                                             # a step as bench's loop and as generate() call it, each step profiled
#                                             # once per model into $OUT/host and $OUT/host_generate
#   bash benchmarks/h100_session.sh batch     # (after students, still warm) `linearize bench` of the teacher and the
#                                             # students BATCH_STUDENTS (default lolcats; BATCH: its arguments, default
#                                             # decode throughput at 32K at the largest batch up to 1,024 that fits,
#                                             # from 128; BATCH_S): a student's doublings prefill about 63M tokens,
#                                             # some 250 s on an H200, so one or two students a call; KEPT_TEACHER=1
#                                             # also benches the teacher converted with every layer kept (its own
#                                             # logits, through the students' batch-wide prefill mask)
#   bash benchmarks/h100_session.sh train_speed  # (after first, still warm) distillation speed alone (SPEED, RUNS,
#                                                # SPEED_S)
#   bash benchmarks/h100_session.sh join      # (after solo or first, still warm) carry .gguf2 corpus.tgz: the join alone
#   bash benchmarks/h100_session.sh delta_bench  # (after solo, still warm) carry .gguf2 and a folder of collect's
#                                             # delta-NAME.tgz (DELTAS): `linearize bench` of those students beside the
#                                             # GGUF teacher, eager and with --compile (BENCH, COMPILED, BENCH_S, KEEPS)
#   bash benchmarks/h100_session.sh before_after  # (after solo, still warm) carry .gguf2, DELTAS' folder and BEFORE (an older
#                                             # linearize): plain generate() of those students (KEEPS) beside the teacher
#                                             # with this tree's code, then BEFORE's, then a profile at TRACE's length
#   bash benchmarks/h100_session.sh delta_serve  # (after delta_bench, still warm) plain generate() of its students beside
#                                             # the GGUF teacher, dynamic and static cache (SERVING, SERVING_S)
#   bash benchmarks/h100_session.sh variants  # (after join, as DETACH=variants) quality runs at once on one GPU, one per
#                                             # ';'-separated argument list in VARIANTS (quality.py's), named v1, v2, ...;
#                                             # SERIAL=1 runs them one after another
#   bash benchmarks/h100_session.sh detach    # (still warm; carry .lmeval for --suite) another mode, DETACH (e.g. pair, with its variables), in a
#                                             # process session of its own (setsid), which outlives the call, run from a
#                                             # copy of the tree in /tmp/code with its OUT in /tmp/detached; returns after
#                                             # WAIT_S seconds (default 0) with what the run has written so far, as
#                                             # detached.tgz (collect too). A
#                                             # quality pair then runs across calls without --resume's reloads and
#                                             # recompiles (eighteenth session), as long as the calls chain
#                                             # (call it unpiped: piped into `tail`, the fifty-second session's call ran
#                                             # to its time limit while the detached run went on)
#   bash benchmarks/h100_session.sh collect   # (after detach, still warm) wait up to COLLECT_S seconds (default 560) for
#                                             # the detached run to end, then return what it wrote; STOP (a pkill -f
#                                             # pattern, e.g. "quality-gp[u]1") ends part of it first; DELTA (quality
#                                             # run names, e.g. "v1 v2") then returns each one's student as its
#                                             # difference from the teacher, delta-NAME.tgz (student_delta.py: a few MB,
#                                             # rebuilt here with its `load`)
#   bash benchmarks/h100_session.sh branch    # carry .whl and .branch.tgz (`git archive --format=tar.gz BRANCH -o
#                                             # .branch.tgz`, untracked: delete it after): an unmerged branch's tree in
#                                             # /tmp/branch, its GPU tests (TESTS, in TEST_FILES: see gpu_tests), then
#                                             # SERVE from that tree as solo runs it
# and in two calls of their own, one right after the other on one machine (tilelang and z3 come to 82 MB):
#   bash benchmarks/h100_session.sh z3         # carry .z3 (z3-solver 4.15's wheel, 29 MB, whose libz3.so.4.15 tilelang loads)
#   bash benchmarks/h100_session.sh tilelang   # carry .tilelang (tilelang's wheels, 53 MB) and fla's two wheels from .whl:
#                                              # fla's gated backward with tilelang (gradient tests, distillation speed);
#                                              # TILELANG=torch, =tests, =fast: one part a call (600 s each)
#   bash benchmarks/h100_session.sh multi_gpu  # carry .whl, on nvidia-h200-x2: one process vs DDP vs FSDP
#   bash benchmarks/h100_session.sh sdpa       # nothing carried: a decode step's SDPA per backend and key layout
# Quality runs take QUALITY="--recipes ... --tokens ..." (quality.py's arguments, default below). The GPU tests
# run in 14 pytest-xdist processes: Triton compiles fla's kernels for each shape and dtype on first use, on the CPU.
# Results land in $OUT (default ./gpu_out). Every carried file comes from `bash benchmarks/gpu_assets.sh`. Wheels (.whl/,
# git-ignored, 3.3 MB): flash-linear-attention and fla-core 0.6.0, gguf 0.19.0, datasets 5.2.0, dill 0.4.1, multiprocess
# 0.70.19 and liger-kernel 0.8.5; lm_eval 0.4.13 (9.1 MB, quality.py's --suite;
# the local suite imports nothing else the image lacks: no sklearn, evaluate, rouge_score, pytablewriter, sqlitedict)
# waits in .lmeval/, since .whl, .gguf1 and the tree with it came to more than 64 MiB a call (twenty-ninth session):
# carry it in a call of its own, e.g. beside .z3, and install it into /tmp/site.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
# WITH_TILELANG=1 (after z3 and a tilelang call, still warm) puts the carried tilelang on the path of any mode, e.g. a
# detached quality run, so that fla's gated backward takes it
export PYTHONPATH=/tmp/site:$PWD${WITH_TILELANG:+:/tmp/tilelang}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/device.txt"

wheels() {  # the carried .whl/ into /tmp/site, which PYTHONPATH names
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

quality() {  # quality TIMEOUT NAME [ARGS]: quality.py on the joined GGUF and the corpus copied by `second`, with ARGS
  # (default $QUALITY)
  local args=${3:-${QUALITY:---recipes liger,hybrid_gdn,lolcats_linear --tokens 400000}}
  timeout "$1" python3 benchmarks/quality.py --teacher /tmp/smollm2.gguf --corpus /tmp/corpus --out "/tmp/quality-$2" \
    $args > "$OUT/quality-$2.log" 2>&1
  echo "exit $?" >> "$OUT/quality-$2.log"
  cp "/tmp/quality-$2/quality.json" "$OUT/quality-$2.json" 2>/dev/null
  (cd "/tmp/quality-$2" && tar czf "$OUT/quality-$2.tgz" --exclude='*.safetensors' --exclude='step-*' . 2>/dev/null)
}

train_speed() {  # train_speed TIMEOUT: train_speed.py once per ';'-separated argument list in SPEED (default below),
  # each under TIMEOUT, 20 steps per stage; RUNS="BATCH:COMPILE,..." where a list names no --runs
  local i=0 speeds speed
  IFS=';' read -ra speeds <<< "${SPEED:---arch smollm2-135m --mixer hedgehog_swa --seq-len 512}"
  for speed in "${speeds[@]}"; do
    i=$((i + 1))
    [[ $speed == *--runs* ]] || speed="$speed --runs ${RUNS:-32:off,32:on}"
    mkdir -p "/tmp/train_speed$i"
    timeout "$1" python3 benchmarks/train_speed.py $speed --steps 20 --out "/tmp/train_speed$i" > "/tmp/train_speed$i/run.log" 2>&1
    echo "exit $?" >> "/tmp/train_speed$i/run.log"
    cp "/tmp/train_speed$i/train_speed.json" "$OUT/train_speed$i.json" 2>/dev/null
    # Two files an entry (a call returns eight): the JSON, and the logs and profiles together.
    (cd "/tmp/train_speed$i" && tar czf "$OUT/train_speed$i.tgz" ./*.log $(ls ./*-profile-*.txt 2>/dev/null))
  done
}

warm() {  # warm: compile, ahead of the quality calls, the fla kernels and layer graphs they will use (Triton's and
  # inductor's caches stay on the warm machine): train_speed.py once per ';'-separated argument list in WARM, all at
  # once (compiling is CPU work), 4 steps per stage, within WARM_S; their rates are not figures
  local i=0 entries entry
  IFS=';' read -ra entries <<< "$WARM"
  for entry in "${entries[@]}"; do
    i=$((i + 1))
    timeout "${WARM_S:-300}" python3 benchmarks/train_speed.py $entry --steps 4 --out "/tmp/warm$i" > "$OUT/warm$i.log" 2>&1 &
  done
  wait
}

gpu_tests() {  # gpu_tests EXPRESSION: TEST_FILES (default tests/test_gpu.py) -k EXPRESSION in TEST_N processes (default 14;
  # on an H100's 80 GB 14 ran out of memory recording CUDA graphs at once, forty-seventh session: 8 there), within TEST_S
  timeout "${TEST_S:-330}" python3 -m pytest -v -p no:cacheprovider -n "${TEST_N:-14}" -m gpu ${TEST_FILES:-tests/test_gpu.py} -k "$1" -rs \
    > "$OUT/gpu_tests.log" 2>&1
  echo "exit $?" >> "$OUT/gpu_tests.log"
}

serve_logged() {  # serving_speed.py with SERVE's arguments on GPU 0, with dynamo's and CUDA-graph trees' logs (SERVE_LOGS)
  CUDA_VISIBLE_DEVICES=0 TORCH_LOGS="${SERVE_LOGS:-cudagraphs,recompiles,graph_breaks,perf_hints}" timeout "${SERVE_S:-300}" \
    python3 benchmarks/serving_speed.py $SERVE --out "$OUT/serving.jsonl" > "$OUT/serving.log" 2>&1
  echo "exit $?" >> "$OUT/serving.log"
}

student_bench() {  # student_bench NAME: serving_speed.py of the student that quality NAME trained, beside the GGUF teacher
  # (STUDENT_BENCH, BENCH_S)
  local student
  student=$(dirname "$(ls /tmp/quality-"$1"/*/config.json | head -1)")
  timeout "${BENCH_S:-100}" python3 benchmarks/serving_speed.py --students "$student" --teacher /tmp/smollm2.gguf \
    ${STUDENT_BENCH:---caches dynamic --lengths 2048,8192} --out "$OUT/student_bench-$1.jsonl" > "$OUT/student_bench-$1.log" 2>&1
  echo "exit $?" >> "$OUT/student_bench-$1.log"
}

serving() {  # export the trained hybrid_qwen3_5 to qwen3_5, check the export where linearize cannot be imported
  # (export_check.py), and bench teacher, student and export (BENCH, BENCH_S)
  local student
  student=$(ls -d /tmp/quality-*/hybrid_qwen3_5 | head -1)
  timeout 120 python3 cli.py export "$student" --to qwen3_5 --out /tmp/native --overwrite > "$OUT/export.log" 2>&1
  echo "exit $?" >> "$OUT/export.log"
  cp /tmp/native/export.json "$OUT/" 2>/dev/null
  timeout 120 python3 benchmarks/export_check.py "$student" /tmp/native --text /tmp/corpus/heldout/persuasion.txt \
    --out "$OUT/export_check.json" > "$OUT/export_check.log" 2>&1
  echo "exit $?" >> "$OUT/export_check.log"
  timeout "${BENCH_S:-200}" python3 cli.py bench /tmp/smollm2.gguf "$student" /tmp/native --no-teacher --device cuda \
    ${BENCH:---lengths 2048,8192 --batch-sizes 1} --out "$OUT/bench_serving.json" > "$OUT/bench_serving.log" 2>&1
  echo "exit $?" >> "$OUT/bench_serving.log"
}

serve_students() {  # serving_speed.py of the students saved under /tmp/students (a distillation cut short leaves only its
  # NAME.checkpoints folder) beside the GGUF teacher, with STUDENT_BENCH's arguments, within BENCH_S; by default each call at a
  # new prompt length, and the teacher also converted with every layer kept (serving_speed.py's docstring)
  timeout "${BENCH_S:-300}" python3 benchmarks/serving_speed.py --students "$(dirname /tmp/students/*/config.json | tr '\n' , | sed 's/,$//')" \
    --teacher /tmp/smollm2.gguf ${STUDENT_BENCH:---caches dynamic --lengths 2048,32768 --repeats 2 --fresh-lengths --kept-teacher} --out "$OUT/students.jsonl" > "$OUT/students.log" 2>&1
  echo "exit $?" >> "$OUT/students.log"
}

join() {  # the GGUF from the first half (in /tmp since an earlier call) and the carried second, checked; the corpus to
  # /tmp/corpus from corpus.tgz (or a carried corpus/)
  cat /tmp/part00 .gguf2/part01 > /tmp/smollm2.gguf
  echo "$(cat .gguf2/sha256)  /tmp/smollm2.gguf" | sha256sum -c > "$OUT/sha256.txt" 2>&1 || return 1
  rm -rf /tmp/corpus
  if [ -f corpus.tgz ]; then mkdir -p /tmp/corpus && tar xzf corpus.tgz -C /tmp/corpus --strip-components=1; elif [ -d corpus ]; then cp -r corpus /tmp/corpus; fi
}

sides() {  # sides MODELS...: serving_speed.py's plain generate() of MODELS (its --students/--teacher or --mixers arguments)
  # with this tree's linearize, then with BEFORE's first on PYTHONPATH (each its own teacher: ratios are read within a
  # process; SIDES=after or before for one), SERVING's arguments, within SERVING_S each; then with TRACE (a length) a
  # profile of their compiled steps at that length with this tree's; the logs and profiles packed into logs.tgz
  local serving="${SERVING:---lengths 2048,32768 --new-tokens 64 --repeats 2 --caches static --bandwidth 3.35e12}"
  for side in ${SIDES:-after before}; do
    path=/tmp/site:$PWD
    [ $side = after ] || path=/tmp/site:$BEFORE:$PWD
    PYTHONPATH=$path timeout "${SERVING_S:-240}" python3 benchmarks/serving_speed.py "$@" --device cuda $serving \
      --out "$OUT/serving_$side.jsonl" > "$OUT/serving_$side.log" 2>&1
    echo "exit $?" >> "$OUT/serving_$side.log"
  done
  if [ -n "${TRACE:-}" ]; then
    timeout 150 python3 benchmarks/serving_speed.py "$@" --device cuda --lengths "$TRACE" --new-tokens 64 --repeats 1 \
      --caches static --trace "$OUT/trace" --out "$OUT/serving_trace.jsonl" > "$OUT/serving_trace.log" 2>&1
    echo "exit $?" >> "$OUT/serving_trace.log"
  fi
  # A call returns eight files: the JSON lines as they are, the logs and the profiles in one archive.
  (cd "$OUT" && tar czf logs.tgz ./*.log ./*.txt $(ls -d trace 2>/dev/null) && rm -rf ./*.log ./*.txt trace)
}

rebuild() {  # rebuild all|keeps: the students of DELTAS (collect's delta-NAME.tgz files) rebuilt beside the joined GGUF
  # (student_delta.py load), and a copy of each with every keep in KEEPS (set-options keep=N); `students` lists their
  # folders, space-separated: with `all` each rebuilt student and its copies, with `keeps` the copies alone
  students=""
  for delta in $DELTAS; do
    name=$(basename "$delta" .tgz)
    mkdir -p "/tmp/$name" && tar xzf "$delta" -C "/tmp/$name"
    python3 benchmarks/student_delta.py load --teacher /tmp/smollm2.gguf --delta "/tmp/$name" --out "/tmp/students/$name" >> "$OUT/delta_load.log" 2>&1
    [ "$1" = keeps ] || students="$students /tmp/students/$name"
    for keep in ${KEEPS:-}; do  # N: keep=N on every layer; N,M@LAYERS: then keep=M on LAYERS (folder NAME-keepN-M)
      spread=${keep%%@*}
      copy="/tmp/students/$name-keep${spread//,/-}"
      python3 cli.py set-options "/tmp/students/$name" --out "$copy" --option keep=${spread%%,*} --overwrite >> "$OUT/delta_load.log" 2>&1
      if [[ $keep == *@* ]]; then
        python3 cli.py set-options "$copy" --out "$copy.more" --option keep=${spread#*,} --layers "${keep#*@}" --overwrite >> "$OUT/delta_load.log" 2>&1
        rm -rf "$copy" && mv "$copy.more" "$copy"
      fi
      students="$students $copy"
    done
  done
}

case "$1" in
solo)  # (nvidia-h200, one GPU) first's carry and set-up, then SERVE (as first), WARM, the GPU tests TESTS,
  # prefill_parts.py (PARTS: its arguments) and train_speed.py (SPEED, each within SPEED_S), each if given, one after another
  wheels || exit 1
  cp .gguf1/part00 /tmp/part00
  [ -z "${SERVE:-}" ] || serve_logged
  [ -z "${WARM:-}" ] || warm
  [ -z "${TESTS:-}" ] || gpu_tests "$TESTS"
  [ -z "${SPEED:-}" ] || train_speed "${SPEED_S:-300}"
  if [ -n "${PARTS:-}" ]; then  # prefill_parts.py with PARTS's arguments, within PARTS_S
    timeout "${PARTS_S:-150}" python3 benchmarks/prefill_parts.py $PARTS --out "$OUT/prefill_parts.jsonl" > "$OUT/prefill_parts.log" 2>&1
    echo "exit $?" >> "$OUT/prefill_parts.log"
  fi
  if [ -n "${KDLOSS:-}" ]; then  # kd_loss_speed.py with KDLOSS's arguments (Liger-Kernel from .whl), within KDLOSS_S
    timeout "${KDLOSS_S:-150}" python3 benchmarks/kd_loss_speed.py $KDLOSS --out "$OUT/kd_loss.json" > "$OUT/kd_loss.log" 2>&1
    echo "exit $?" >> "$OUT/kd_loss.log"
  fi
  [ -z "${MIXERS:-}" ] || sides --mixers "$MIXERS"  # random-weight students at SmolLM2's shape, before and after (sides)
  ;;
branch)  # an unmerged branch's GPU tests (TESTS) and SERVE, from its archive .branch.tgz (the header says how to make it)
  wheels || exit 1
  mkdir -p /tmp/branch && tar xzf .branch.tgz -C /tmp/branch || exit 1
  OUT=$(realpath "$OUT")
  cd /tmp/branch || exit 1
  export PYTHONPATH=/tmp/site:/tmp/branch
  [ -z "${TESTS:-}" ] || gpu_tests "$TESTS"
  [ -z "${SERVE:-}" ] || serve_logged
  ;;
first)
  wheels || exit 1
  cp .gguf1/part00 /tmp/part00
  if [ -n "${SERVE:-}" ]; then
    serve_logged &
    export CUDA_VISIBLE_DEVICES=1
  fi
  [ -z "${WARM:-}" ] || warm &  # compiling is CPU work: beside the tests
  [ "${TESTS:-not real_teacher}" = none ] || gpu_tests "${TESTS:-not real_teacher}"
  wait
  [ "${RUNS:-32:off,32:on}" = none ] || train_speed 200
  ;;
train_speed)
  train_speed "${SPEED_S:-560}"
  ;;
students)
  join || exit 1
  recipes=${STUDENTS:-lolcats lolcats_linear liger mamba_in_llama hybrid_gdn hybrid_qwen3_5 hybrid_bamba}
  for recipe in $recipes; do
    stages=$(python3 -c "from linearize.config import load_recipe; print(len(load_recipe('$recipe').stages))")
    overrides=""
    for ((i = 0; i < stages; i++)); do overrides="$overrides stages.$i.tokens=${STUDENT_TOKENS:-16384} stages.$i.compile=false"; done
    (timeout "${DISTILL_S:-240}" python3 cli.py distill "$recipe" teacher=/tmp/smollm2.gguf data.train=/tmp/corpus/train data.heldout=/tmp/corpus/heldout/persuasion.txt \
       data.streaming=false data.seq_len=512 --out /tmp/students/"$recipe" --overwrite $overrides > "/tmp/distill-$recipe.log" 2>&1
     echo "exit $?" >> "/tmp/distill-$recipe.log") &
    [ "${AT_ONCE:-1}" = 1 ] || wait  # AT_ONCE=0: one after another (beside two others, lolcats_linear's first step
    # printed nothing in 200 s twice; alone it took 58.5 s, twentieth session)
  done
  wait  # all at once: a cold machine's kernel compiles are CPU work, and a 135M student leaves most of the GPU idle
  for recipe in $recipes; do
    # the end of each log (the stages' table, the time, the exit) in one file: a call returns at most 8 files
    echo "== $recipe" && tail -n 20 "/tmp/distill-$recipe.log"
  done > "$OUT/distill.log"
  [ "${STUDENT_BENCH:-}" = none ] || serve_students
  ;;
students_serve)
  serve_students
  host=${HOST:-lolcats,hybrid_gdn,hybrid_qwen3_5}
  if [ "$host" != none ]; then  # an eager decode step's host time per layer kind
    for inputs in "" --as-generate; do  # the step as bench's loop calls it, then as generate() does
      timeout "${HOST_S:-150}" python3 benchmarks/decode_dispatches.py --device cuda --dtype bfloat16 --teacher /tmp/smollm2.gguf \
        --recipes "$host" --context 2048 --steps 30 --jsonl "$OUT/host.jsonl" --trace "$OUT/host${inputs:+_generate}" $inputs >> "$OUT/host.log" 2>&1
      echo "exit $? ${inputs}" >> "$OUT/host.log"
    done
  fi
  ;;
batch)  # (after students, still warm) `linearize bench` of the GGUF teacher and the students BATCH_STUDENTS, with BATCH's
  # arguments (default: decode throughput at 32K at the largest batch that fits, up to 1024, prefilled 4K tokens at a
  # time), within BATCH_S; a student whose distillation did not finish (no config.json) is left out
  saved=""
  if [ -n "${KEPT_TEACHER:-}" ]; then  # the teacher with every layer kept as a student: the teacher's logits (tested), and
    # the student's one mask for a batch without padding in a chunked prefill (transformers' costs SDPA a copy per sequence)
    timeout 120 python3 cli.py convert /tmp/smollm2.gguf --mixer attention --out /tmp/students/teacher_kept > "$OUT/kept.log" 2>&1
    saved=" /tmp/students/teacher_kept"
  fi
  for student in ${BATCH_STUDENTS:-lolcats}; do [ -f "/tmp/students/$student/config.json" ] && saved="$saved /tmp/students/$student"; done
  timeout "${BATCH_S:-540}" python3 cli.py bench /tmp/smollm2.gguf $saved \
    --no-teacher --device cuda ${BATCH:---lengths 32768 --batch-sizes 128 --max-batch 1024 --no-bisect --decode-tokens 16 --allow-longer --prefill-chunk 4096} \
    --out "$OUT/batch.json" > "$OUT/batch.log" 2>&1
  echo "exit $?" >> "$OUT/batch.log"
  ;;
delta_bench)  # (after solo, still warm; carry .gguf2 and the folder of DELTAS, e.g. runs/keepbench) each student in
  # DELTAS and a copy of each with every keep in KEEPS (e.g. "0 512"; `rebuild`), then `linearize bench` of the GGUF teacher and the students, eager with
  # BENCH's arguments and with --compile (COMPILED: its arguments, or none), within BENCH_S each
  join || exit 1
  rebuild all
  bench="${BENCH:---lengths 2048,8128,32768 --decode-tokens 64 --repeats 2 --allow-longer}"
  timeout "${BENCH_S:-270}" python3 cli.py bench /tmp/smollm2.gguf $students --no-teacher --device cuda $bench --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  echo "exit $?" >> "$OUT/bench.log"
  if [ "${COMPILED:-}" != none ]; then
    timeout "${BENCH_S:-270}" python3 cli.py bench /tmp/smollm2.gguf $students --no-teacher --device cuda --compile ${COMPILED:-$bench} \
      --out "$OUT/bench_compiled.json" > "$OUT/bench_compiled.log" 2>&1
    echo "exit $?" >> "$OUT/bench_compiled.log"
  fi
  ;;
before_after)  # (after solo, still warm; carry .gguf2, the folder of DELTAS and BEFORE, a folder holding an older
  # `linearize` package, e.g. `mkdir -p runs/old && git archive REV linearize | tar -x -C runs/old`) the copies of
  # DELTAS' students with every keep in KEEPS (`rebuild`), then plain generate() of them beside the GGUF
  # teacher (serving_speed.py, SERVING's arguments, SERVING_S) with this tree's linearize, then with BEFORE's first on
  # PYTHONPATH (each its own teacher: ratios are read within a process; SIDES=after or before for one), then with TRACE
  # (a length) a profile of those students' compiled steps at that length with this tree's
  join || exit 1
  rebuild keeps
  students=$(echo $students | tr ' ' ,)
  sides --students "$students" --teacher /tmp/smollm2.gguf $serving
  ;;
delta_serve)  # (after delta_bench, still warm) plain generate() of the students delta_bench rebuilt beside the GGUF
  # teacher, dynamic and static cache (serving_speed.py; SERVING: its arguments, SERVING_S)
  students=$(ls -d /tmp/students/* | paste -sd, -)
  timeout "${SERVING_S:-540}" python3 benchmarks/serving_speed.py --students "$students" --teacher /tmp/smollm2.gguf --device cuda \
    ${SERVING:---lengths 2048,32768 --new-tokens 64 --repeats 2} --out "$OUT/serving.jsonl" > "$OUT/serving.log" 2>&1
  echo "exit $?" >> "$OUT/serving.log"
  ;;
join)  # (after solo or first, still warm; carry .gguf2 corpus.tgz) the GGUF and the corpus into /tmp, nothing else: a
  # detached run (detach) leaves the carried halves behind
  join
  ;;
variants)  # (after join, still warm, as DETACH=variants) one quality run per ';'-separated argument list in VARIANTS, all
  # at once on the one GPU (a 135M student leaves most of an H200 idle), named v1, v2, ... within QUALITY_S each, or one
  # after another with SERIAL=1 (each alone on the GPU, so that its training time is its own); then SPEED, if given, as
  # train_speed, alone on the GPU and on the kernel caches the runs left warm
  IFS=';' read -ra lists <<< "$VARIANTS"
  for ((i = 0; i < ${#lists[@]}; i++)); do
    if [ -n "${SERIAL:-}" ]; then
      quality "${QUALITY_S:-1100}" "v$((i + 1))" "${lists[$i]}"
    else
      quality "${QUALITY_S:-1100}" "v$((i + 1))" "${lists[$i]}" &
    fi
  done
  wait
  [ -z "${SPEED:-}" ] || train_speed "${SPEED_S:-300}"
  ;;
second)
  join || exit 1
  export LINEARIZE_SMOLLM2_GGUF=/tmp/smollm2.gguf
  if [ "${TESTS:-real_teacher}" != none ]; then
    timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -n 5 -m gpu tests/test_gpu.py -k "${TESTS:-real_teacher}" > "$OUT/gpu_real_teacher.log" 2>&1
    echo "exit $?" >> "$OUT/gpu_real_teacher.log"
  fi
  quality "${QUALITY_S:-420}" second
  ;;
quality)
  quality "${QUALITY_S:-580}" "${RUN:-third}"
  ;;
pair)  # (after second's join, or as second with JOIN=1) two quality runs at once, one per GPU of nvidia-h200-x2:
  # QUALITY0 and QUALITY1 are their arguments, named gpu0 and gpu1; PAIR_GPUS="0 0" runs both on one GPU (nvidia-h200:
  # a 135M student leaves most of an H200 idle)
  read -r gpu0 gpu1 <<< "${PAIR_GPUS:-0 1}"
  if [ -n "${JOIN:-}" ]; then
    join || exit 1
  fi
  if [ -n "${SERVE:-}" ]; then  # GPU 0 measures serving instead, then runs the GPU tests TESTS, if given
    (serve_logged; [ -z "${TESTS:-}" ] || CUDA_VISIBLE_DEVICES=0 gpu_tests "$TESTS") &
  elif [ -n "${QUALITY0:-}" ]; then  # QUALITY0="" runs QUALITY1 alone
    CUDA_VISIBLE_DEVICES=$gpu0 quality "${QUALITY_S:-570}" gpu0 "$QUALITY0" &
  fi
  CUDA_VISIBLE_DEVICES=$gpu1 quality "${QUALITY_S:-570}" gpu1 "$QUALITY1" &
  if [ -n "${BESIDE:-}" ]; then  # a command of its own beside both runs, on GPU 0, within BESIDE_S
    (CUDA_VISIBLE_DEVICES=0 timeout "${BESIDE_S:-500}" bash -c "$BESIDE" > "$OUT/beside.log" 2>&1
     echo "exit $?" >> "$OUT/beside.log") &
  fi
  wait
  ;;
generate)  # (after a pair call that trained hybrid_qwen3_5 and hybrid_gdn, still warm) plain generate() of the trained
  # students, hybrid_qwen3_5's export and the GGUF teacher, dynamic and static cache (GENERATE, GENERATE_S), on GPU 0,
  # while GPU 1 runs QUALITY1 (named gpu1b), if given
  [ -z "${QUALITY1:-}" ] || CUDA_VISIBLE_DEVICES=1 quality "${QUALITY_S:-570}" gpu1b "$QUALITY1" &
  student=$(ls -d /tmp/quality-*/hybrid_qwen3_5 | head -1)
  python3 cli.py export "$student" --to qwen3_5 --out /tmp/native --overwrite > "$OUT/export.log" 2>&1
  echo "exit $?" >> "$OUT/export.log"
  cp /tmp/native/export.json "$OUT/" 2>/dev/null
  students=$(ls -d /tmp/quality-*/hybrid_gdn /tmp/quality-*/hybrid_qwen3_5 | tr '\n' ,)/tmp/native
  CUDA_VISIBLE_DEVICES=0 timeout "${GENERATE_S:-500}" python3 benchmarks/serving_speed.py --students "$students" \
    --teacher /tmp/smollm2.gguf ${GENERATE:---lengths 2048,8192,32768} --out "$OUT/generate.jsonl" > "$OUT/generate.log" 2>&1
  echo "exit $?" >> "$OUT/generate.log"
  wait
  ;;
serving)
  serving
  ;;
detach)
  # lm-eval from a carried .lmeval/ (beside the tree alone this call stays under 64 MiB), for quality.py's --suite
  [ ! -d .lmeval ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .lmeval/*.whl || exit 1
  rm -rf /tmp/code /tmp/detached /tmp/detached.pid && mkdir -p /tmp/code /tmp/detached
  tar --exclude=./.whl --exclude=./.gguf1 --exclude=./.gguf2 --exclude=./corpus.tgz --exclude=./.tilelang --exclude=./.z3 \
    --exclude=./.lmeval -cf - . | tar -xf - -C /tmp/code
  # The run writes its own pid: the device runs a call under job control, so a background job leads its process group
  # and setsid forks it off, and $! named the exited parent (collect then returned at once; twenty-ninth session).
  (cd /tmp/code && OUT=/tmp/detached setsid nohup bash -c 'echo $$ > /tmp/detached.pid; exec bash benchmarks/h100_session.sh "$0"' \
     "$DETACH" > /tmp/detached/detached.log 2>&1 < /dev/null &)
  for ((tries = 0; tries < 50; tries++)); do [ -s /tmp/detached.pid ] && break; sleep 0.1; done
  sleep "${WAIT_S:-0}"
  tar czf "$OUT/detached.tgz" -C /tmp/detached .  # one file: a call returns at most 8
  ;;
collect)
  [ -z "${STOP:-}" ] || pkill -f "$STOP"
  for ((waited = 0; waited < ${COLLECT_S:-560}; waited += 10)); do
    kill -0 "$(cat /tmp/detached.pid)" 2>/dev/null || break
    sleep 10
  done
  kill -0 "$(cat /tmp/detached.pid)" 2>/dev/null && echo "the detached run is still going" >> /tmp/detached/detached.log
  tar czf "$OUT/detached.tgz" -C /tmp/detached .
  for name in ${DELTA:-}; do  # each quality run's one student folder (the one holding config.json)
    student=$(dirname "$(ls /tmp/quality-"$name"/*/config.json | head -1)")
    python3 benchmarks/student_delta.py save --teacher /tmp/smollm2.gguf --student "$student" --out "/tmp/delta-$name" \
      > "/tmp/delta-$name.log" 2>&1
    cp "/tmp/delta-$name.log" "/tmp/delta-$name/"
    tar czf "$OUT/delta-$name.tgz" -C "/tmp/delta-$name" .
  done
  ;;
finish)  # (after pair, still warm) QUALITY0 and QUALITY1 again, which name --resume, so that both runs finish training
  # and scoring; then each GPU exports and checks its hybrid_qwen3_5 (serving) or benches its other student
  for gpu in 0 1; do
    (export CUDA_VISIBLE_DEVICES=$gpu
     args=QUALITY$gpu
     quality "${QUALITY_S:-330}" "gpu$gpu" "${!args}"
     if [ -d "/tmp/quality-gpu$gpu/hybrid_qwen3_5" ]; then serving; else student_bench "gpu$gpu"; fi) &
  done
  wait
  ;;
sdpa)  # (any machine; nothing carried) SDPA alone in decode steps per backend and key layout (sdpa_decode.py), at 2K
  # and 32K, without and with cuDNN's TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, within SDPA_S each
  for context in 2048 32768; do
    for avoid in "" 1; do
      env ${avoid:+TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1} timeout "${SDPA_S:-60}" python3 benchmarks/sdpa_decode.py --context "$context" \
        --steps 50 --out "$OUT/sdpa_decode.jsonl" >> "$OUT/sdpa_decode.log" 2>&1
      echo "exit $? (context $context, avoid-recompile '${avoid}')" >> "$OUT/sdpa_decode.log"
    done
  done
  ;;
z3)  # (nvidia-h200, fresh; carry .z3) z3-solver into /tmp/tilelang, for the tilelang call that follows at once: without it
  # tilelang 0.1.15 fails to import (libz3.so.4.15 missing, twelfth session)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tilelang .z3/*.whl
  ;;
tilelang)  # (after z3, still warm; carry .tilelang and .whl's fla_core and flash_linear_attention wheels) whether fla's
  # gated backward runs on Hopper with the carried tilelang 0.1.15 (.tilelang/: its wheel, apache-tvm-ffi,
  # torch-c-dlpack-ext): a hybrid_gdn-shaped student's distillation speed on the PyTorch path (part torch), fla's
  # gradient tests and bf16 training steps (tests; TILELANG_TESTS, a -k expression) and the same speed with tilelang
  # importable (fast), the parts in TILELANG (default all three; install: none, tilelang put on the path alone), SPEED_S
  # and TEST_S each. On a fresh machine 130 s was too little for every part (twenty-ninth session: the compiled
  # first step alone outlasts it), so the parts go into calls of their own, chained, each within a call's 600 s
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/fla_core-*.whl \
    .whl/flash_linear_attention-*.whl 2>/dev/null || [ -d /tmp/site/fla ] || exit 1
  speed="--arch smollm2-135m --mixer gated_deltanet --options window=64 --keep-attention every:4 --seq-len 512 --runs 32:on --steps 20 --profile 3"
  for part in ${TILELANG:-torch tests fast}; do
    if [ "$part" != torch ]; then
      [ -d /tmp/tilelang/tilelang ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tilelang \
        .tilelang/*.whl || exit 1
      export PYTHONPATH=/tmp/tilelang:$PYTHONPATH
      python3 -c "import tilelang; from linearize.hf import kernel_dispatch as k; print(tilelang.__version__, k.gated_backward_problem())" \
        > "$OUT/tilelang.log" 2>&1
    fi
    case $part in
    install)  # tilelang and fla on the path for later calls (WITH_TILELANG=1), tilelang.log, nothing run
      ;;
    tests)
      timeout "${TEST_S:-300}" python3 -m pytest -v -p no:cacheprovider -n 8 -m gpu tests/test_gpu.py -k "${TILELANG_TESTS:-gradients or bfloat16_training_step}" -rs > "$OUT/gpu_tests.log" 2>&1
      echo "exit $?" >> "$OUT/gpu_tests.log"
      ;;
    torch|fast)
      path=$([ "$part" = torch ] && echo torch || echo tilelang)
      timeout "${SPEED_S:-300}" python3 benchmarks/train_speed.py $speed --out "/tmp/speed-$path" > "$OUT/train_speed-$path.log" 2>&1
      echo "exit $?" >> "$OUT/train_speed-$path.log"
      cp "/tmp/speed-$path/train_speed.json" "$OUT/train_speed-$path.json" 2>/dev/null
      # the log and the stages' profiles in one file: a call returns at most 8
      (cd "/tmp/speed-$path" && tar czf "$OUT/distill-$path.tgz" ./*.log $(ls ./*-profile-*.txt 2>/dev/null))
      ;;
    *)
      echo "TILELANG names torch, tests, fast and install, not $part" >&2; exit 2
      ;;
    esac
  done
  ;;
multi_gpu)
  wheels || exit 1
  timeout "${MULTI_S:-540}" python3 benchmarks/multi_gpu.py --runs "${MULTI_RUNS:-one_gpu,ddp,fsdp}" --out /tmp/multi_gpu > "$OUT/multi_gpu.log" 2>&1
  echo "exit $?" >> "$OUT/multi_gpu.log"
  cp /tmp/multi_gpu/multi_gpu.json /tmp/multi_gpu/*.log "$OUT/" 2>/dev/null
  ;;
*)
  echo "usage: bash benchmarks/h100_session.sh solo|first|students|batch|join|delta_bench|variants|second|quality|pair|finish|generate|serving|detach|collect|train_speed|sdpa|z3|tilelang|multi_gpu" >&2; exit 2
  ;;
esac
