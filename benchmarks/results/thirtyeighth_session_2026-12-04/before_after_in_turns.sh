# decode_paired.py run from a worktree of 3b6a841 (base, before this session's changes) and from the work tree, in
# alternation, two rounds: each run's ratios are against its own teacher, timed in turns with it.
#   git worktree add /tmp/s38/base 3b6a841
#   R=lolcats,lolcats_linear,liger,mamba_in_llama,hybrid_gdn,hybrid_qwen3_5,hybrid_bamba,hybrid_long B=16 bash before_after_in_turns.sh
# BASE: the base worktree (thirty-ninth session: BASE=/tmp/s39/base, a worktree of 852add8, R=lolcats,hybrid_long,hybrid_gdn B=12).
R=${R:-hybrid_long,hybrid_gdn,hybrid_qwen3_5}
for i in 1 2; do
  for tree in base work; do
    if [ $tree = base ]; then dir=${BASE:-/tmp/s38/base}; else dir=/work/main; fi
    echo "== $tree round $i"
    (cd $dir/benchmarks && PYTHONPATH=$dir python decode_paired.py --recipes $R --blocks ${B:-16} 2>&1 | grep "teacher / it" | grep -v "^teacher")
  done
done
