def best_last_u(tau, u, fn=LOG):
    u = np.array(u, float)
    def f(v):
        w = u.copy(); w[-1] = v; return loss(tau, w, fn)
    grid = np.arange(-3.0, 0.51, 0.25); c = grid[int(np.argmin([f(v) for v in grid]))]
    fine = np.arange(c - 0.25, c + 0.2501, 0.05); vals = [f(v) for v in fine]; i = int(np.argmin(vals))
    u[-1] = fine[i]; return u, vals[i]


def cd_u(tau, u, fn, which, deltas=(0.4, 0.2, 0.1, 0.05, 0.02), max_trials=300):
    u = np.array(u, float); err = loss(tau, u, fn); trials = 0
    for d in deltas:
        improved = True
        while improved and trials < max_trials:
            improved = False
            for k in which:
                for sgn in (-1, 1):
                    w = u.copy(); w[k] += sgn * d; e = loss(tau, w, fn); trials += 1
                    if e < err: u, err, improved = w, e, True
    return u, err


def cd_tau(tau, u, err, deltas=(16, 8, 4, 2, 1), max_trials=120):
    tau = np.array(tau); trials = 0; pos = {int(t): i for i, t in enumerate(cand.tolist())}
    for d in deltas:
        improved = True
        while improved and trials < max_trials:
            improved = False
            for i in range(S):
                for sgn in (-1, 1):
                    if trials >= max_trials: break
                    cur = int(tau[i]); ci = pos.get(cur, int(np.searchsorted(cand, cur))); ni = ci + sgn * d
                    if not 0 <= ni < len(cand): continue
                    tn = int(cand[ni]); lo = int(tau[i - 1]) if i > 0 else -1; hi = int(tau[i + 1]) if i + 1 < S else 1000
                    if not lo < tn < hi: continue
                    tr = tau.copy(); tr[i] = tn; trials += 1
                    w, e = best_last_u(tr, u)
                    if e < err: tau, u, err, improved = tr, w, e, True
    return tau, u, err


def evaluate(tag, tau, u, count=True, extra=None):
    n0 = NL[0]
    x = run_var(tau, xt_eval, u); sc = score(m, x, std); xh = run_var(tau, xt_ho, u)
    td = np.asarray(tau)[::-1]
    r = dict(cell=f"{mname}|{solver}|S{S}", variant=variant, tag=tag, tau=[int(t) for t in tau], u=[round(float(v), 3) for v in u],
             t_model=[tprime_of(t, float(v)) for t, v in zip(td, u)] if variant == "ld3i" else
                     [round(float(np.interp(sig2_of(t) * math.exp(2 * v), S2, AR)), 1) for t, v in zip(td, u)],
             score=round(sc[0], 4), ratio=round(sc[0] / d20, 3),
             tune_rms=round(RMS(run_var(tau, xt_tune, u), ref_tune), 4), tune_log=round(LOG(run_var(tau, xt_tune, u), ref_tune), 5),
             ho_rms=round(RMS(xh, ref_ho), 4), ho_log=round(LOG(xh, ref_ho), 5))
    if extra: r.update(extra)
    print(json.dumps(r), flush=True); return r
