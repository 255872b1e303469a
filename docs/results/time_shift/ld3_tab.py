import json, glob, collections
R = []
for f in sorted(glob.glob("r_*.log")):
    for l in open(f):
        if l.startswith("{"): R.append(json.loads(l))
for r in R:
    print(f"{r['cell']:16s} {r['variant']:7s} {r['tag']:22s} {r['ratio']:7.3f} tlog {r['tune_log']:.5f} trms {r['tune_rms']:.4f} horms {r['ho_rms']:.4f} holog {r['ho_log']:.5f} tau {r['tau']} tm {r['t_model']} {r.get('sec','')} {r.get('loss_evals','')}")
