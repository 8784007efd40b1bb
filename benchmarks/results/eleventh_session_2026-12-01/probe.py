"""GPU probe (eleventh session): the fused step's graph breaks in a compiled decode step, and cached vs uncached
greedy tokens of test_mixer_on_gpu_both_paths_and_cached_generation[gated_deltanet+window], fused on and off."""
import os, sys, torch
sys.path.insert(0, "tests")
import linearize
from tiny import tiny_model, random_ids, left_padded
from transformers import StaticCache

what = sys.argv[1]
if what == "explain":
    for dtype in (torch.float32, torch.bfloat16):
        model = linearize.convert(tiny_model(dtype=dtype, hidden_size=128, num_attention_heads=4, num_key_value_heads=2), "gated_deltanet", window=4).eval().cuda()
        ids = random_ids(1, 12).cuda()
        cache = StaticCache(config=model.config, max_cache_len=32)
        kw = "cache" if "cache" in model.forward.__code__.co_varnames else "past_key_values"
        with torch.no_grad():
            out = model(input_ids=ids, **{kw: cache}, use_cache=True, cache_position=torch.arange(12, device="cuda"))
            nxt = out.logits[:, -1:].argmax(-1)
            ex = torch._dynamo.explain(model)(input_ids=nxt, **{kw: cache}, use_cache=True, cache_position=torch.tensor([12], device="cuda"))
        print(dtype, "graphs", ex.graph_count, "breaks", ex.graph_break_count, flush=True)
        for b in ex.break_reasons[:4]:
            print("BREAK:", b.reason[:600]); print("   ", [str(f)[:300] for f in b.user_stack[-4:]], flush=True)
else:
    model = linearize.convert(tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=2, num_key_value_heads=1), "gated_deltanet", window=8).cuda()
    ids, mask = left_padded(random_ids(2, 70), [5, 0])
    ids, mask = ids.cuda(), mask.cuda()
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    cached = model.generate(**settings)
    uncached = model.generate(**settings, use_cache=False)
    same = torch.equal(cached, uncached)
    print(os.environ.get("LINEARIZE_FUSED_STEP"), "equal", same, flush=True)
    if not same:
        row, col = (cached != uncached).nonzero()[0].tolist()
        with torch.no_grad():
            logits = model(uncached[:, :col], attention_mask=torch.cat([mask, torch.ones_like(uncached[:, 70:col])], 1)).logits[row, -1].float()
        top = logits.topk(2)
        print("first difference row", row, "position", col, "cached", cached[row, col].item(), "uncached", uncached[row, col].item(),
              "top-2 logits", top.values.tolist(), "ids", top.indices.tolist(), flush=True)
