"""Per layer, the share of the asked needle line's tokens among the kept keys (its 3 kv heads together), averaged over
the prompts the student answered and over those it missed, from kept_needles.py's JSON at 4K (512 and 1,024 kept keys
together): python kept_needles_layers.py"""
import json

rows = json.load(open("kept_needles_4096_512.json")) + json.load(open("kept_needles_4096_1024.json"))
layers = sorted(rows[0]["kept_asked_by_layer"], key=int)


def share(row, layer):
    return sum(row["kept_asked_by_layer"][layer]) / (len(row["kept_asked_by_layer"][layer]) * row["asked_line_tokens"])


hits, misses = [r for r in rows if r["hit"]], [r for r in rows if not r["hit"]]
print(f"{len(hits)} answered, {len(misses)} missed")
table = [(sum(share(r, l) for r in hits) / len(hits), sum(share(r, l) for r in misses) / len(misses), l) for l in layers]
for h, m, layer in sorted(table, key=lambda t: t[1] - t[0]):
    print(f"layer {layer:>2}: answered {h:.2f}  missed {m:.2f}")
print(f"mean: answered {sum(t[0] for t in table) / len(table):.2f}  missed {sum(t[1] for t in table) / len(table):.2f}")
