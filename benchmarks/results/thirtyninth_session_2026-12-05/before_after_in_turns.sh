# decode_paired.py run from a worktree of 852add8 (base, before this session's changes) and from the work tree, in
# alternation, two rounds: each run's ratios are against its own teacher, timed in turns with it.
#   git worktree add /tmp/s39/base 852add8
#   R=lolcats,hybrid_long,hybrid_gdn B=12 bash before_after_in_turns.sh   (this session's run, .log)
R=${R:-hybrid_long,hybrid_gdn,hybrid_qwen3_5}
for i in 1 2; do
  for tree in base work; do
    if [ $tree = base ]; then dir=/tmp/s39/base; else dir=/work/main; fi
    echo "== $tree round $i"
    (cd $dir/benchmarks && PYTHONPATH=$dir python decode_paired.py --recipes $R --blocks ${B:-16} 2>&1 | grep "teacher / it" | grep -v "^teacher")
  done
done
