import json, glob, collections, sys
pat = sys.argv[1] if len(sys.argv) > 1 else "r_"
R = [json.loads(l) for f in sorted(glob.glob(f"{pat}*.log")) for l in open(f) if l.startswith("{")]
G = collections.defaultdict(list)
for r in R: G[(r["cell"], r["variant"], r["tag"].split("|")[0])].append(r)
P = collections.defaultdict(list)
for (c, v, s), rs in sorted(G.items()):
    hy = {r["tag"].split("|")[1]: r["ratio"] for r in rs if r["tag"].endswith("hybrid")}
    sel = {k: min(rs, key=lambda r: r[k]) for k in ("ho_rms", "ho_log")}
    P[(c, v)] += rs
    print(f"{c:16s} {v:7s} seed {s:>2s} hybrid {hy}  pick-ho_rms {sel['ho_rms']['ratio']:.3f} ({sel['ho_rms']['tag'][len(s)+1:]})  pick-ho_log {sel['ho_log']['ratio']:.3f} ({sel['ho_log']['tag'][len(s)+1:]})  oracle {min(r['ratio'] for r in rs):.3f}")
for (c, v), rs in P.items():
    a = min(rs, key=lambda r: r["ho_rms"]); b = min(rs, key=lambda r: r["ho_log"])
    print(f"POOLED {c} {v}: ho_rms -> {a['ratio']} ({a['tag']}), ho_log -> {b['ratio']} ({b['tag']})")
