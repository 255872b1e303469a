import json, glob, collections, sys
pat = sys.argv[1] if len(sys.argv) > 1 else "r_"
R = [json.loads(l) for f in sorted(glob.glob(f"{pat}*.log")) for l in open(f) if l.startswith("{")]
T = collections.defaultdict(dict)
for r in R:
    s, st, ph = r["tag"].split("|"); T[(r["cell"], st, ph)][(r["variant"], int(s))] = r["ratio"]
for (c, st, ph), d in sorted(T.items()):
    if ph == "as is" and st == "logsnr": continue
    for v in ("rescale", "ld3", "ld3i"):
        row = [f"{d.get((v, s), float('nan')):6.2f}" for s in (0, 7, 8, 9, 10)]
        if any(x.strip() != "nan" for x in row): print(f"{c:15s} {st:9s} {ph:6s} {v:7s} " + " ".join(row))
