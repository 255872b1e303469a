"""Timesteps tuned to the user's own model: ``tune_timesteps`` and its JSON file format.

The search is GITS (Chen et al., "On the Trajectory Regularity of ODE-based Diffusion
Sampling", ICML 2024), followed by a direct local search on the solver's own error:

1. A fine teacher trajectory from x_T (DPM-Solver++(3M) on ``teacher_steps`` timesteps, a fine
   superset of the candidate grid) gives the ODE state x_i and the model's x0-prediction (hence
   eps_i) at every grid timestep, and the converged end point x0*.
2. GITS' dynamic program: the cost of a jump i -> j is the error (``loss``) of one DDIM step (Eq. 12,
   eta = 0) from the teacher's (x_i, eps_i) against the teacher's x_j; the cheapest path of
   exactly S jumps from t = T - 1 to alpha = 1 is found in O(S G^2) with no further model calls.
   GITS picks it because the trajectory is regular (nearly the same shape for every x_T), so a
   small batch suffices, and the local costs are shared by every candidate path.
3. The DP optimises DDIM's local errors, not the chosen multistep solver's global error, so the
   best of (the DP path, the "logsnr", "karras" and "quad" spacings) by the solver's actual
   distance to x0* is refined by coordinate descent: each interior timestep moves along the
   grid (steps of 4, 2, 1 grid points; 16 first with the "log" loss) while the end-to-end error
   falls (a direct search in the spirit of LD3, Tong et al. 2024, without gradients: S model
   calls per trial).

4. With ``shift_last=True`` the last call's model timestep t' is searched with every candidate
   sequence, the solver's coefficients kept at tau (the decoupled timestep that LD3 learns for
   every step, Tong et al., ICLR 2025; here only the last, by a grid over sigmabar(t') /
   sigmabar(t) in [e^-3, e^0.5]): the trajectory up to the last call is run once, then each t'
   costs one call. It is what brings the sharp mixture to within 2x of DDIM at S = 20 at S = 5
   (docs/results/quality.md), where no choice of timesteps alone can (the last x0-prediction from a
   timestep that still resolves the modes' shares collapses each narrow mode), and where iPNDM's
   full-order last step overshoots without it (sharp mixture, S = 5: 0.68-0.81x DDIM S = 20's
   score over ten tuning seeds, against 93-161x). Sampling then needs
   ``FusedSampler(model_timesteps=info["model_timesteps"])`` (``save_tuned`` stores them).

The distance (``loss``) is the RMS error over the batch ("rms", GITS' and LD3's L2), or the
geometric mean of the samples' own RMS errors ("log"). The RMS error is dominated by the few
samples whose trajectory ends in another mode, so it cannot see the data's fine structure: on
a mixture of narrow modes (std 0.05 in D = 8) it keeps the smallest timestep where the final
x0-prediction collapses every mode to a fifth of its width. The log loss weighs every sample's
relative error alike (docs/results/quality.md: what each gives on the mixtures); its search
starts from coarser moves, and ``max_trials`` defaults to 120 for it, as measured there.

Every run is the sampler's own: a ``trajectory.Plan`` run by ``trajectory.run`` (the one loop,
the one output normalisation ``trajectory.ModelCall``, the fused op), recording the teacher's
states and x0-predictions in the loop's own buffers. Everything is deterministic for a seed:
x_T is the sampler's own Philox x_T of that seed, the batch is one forward per step, and ties
keep the earlier candidate. The result is never worse, on the tuning batch and by its loss,
than the best named spacing it started from.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ddim_fast import layout, ops, reference, solvers, trajectory
from ddim_fast.schedule import NoiseSchedule

__all__ = ["tune_timesteps", "save_tuned", "load_tuned", "schedule_digest", "FORMAT", "FORMATS"]

FORMAT = "ddim_fast.tuned_timesteps/1"
# A file whose model is told other timesteps than tau (shift_last): readers of /1 would drop them.
FORMAT_MODEL_TIMESTEPS = "ddim_fast.tuned_timesteps/2"
FORMATS = (FORMAT, FORMAT_MODEL_TIMESTEPS)
START_SPACINGS = ("logsnr", "karras", "quad")
# Grid points a timestep moves per trial, coarse to fine. The "log" loss's basins lie far apart on
# the grid (sharp mixture, S = 5: smallest timestep ~70 under "rms", 2-15 under "log"); started
# at 4 it stopped in the nearer one (unipc, 60 trials: 7.9x DDIM S = 20's score; from 16: 2.6x,
# and 2.05x with 120 trials; n = 4,000). With "rms", 16 first was worse (11.9x vs 7.2x).
_DELTAS = {"rms": (4, 2, 1), "log": (16, 8, 4, 2, 1)}


class _Runner:
    """The model on one batch, run through the sampler's own plan and loop (``ddim_fast.trajectory``):
    the same output normalisation (``ModelCall``: tensor, tuple, ``.sample``, learned variance),
    the same fused op, float32 state, from the sampler's Philox x_T of ``seed``."""

    def __init__(self, model, schedule, shape, seed, model_kwargs, prediction, backend):
        self.schedule, self.kwargs, self.shape = schedule, dict(model_kwargs or {}), tuple(shape)
        p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        self.device = p.device if p is not None else torch.device("cpu")
        self.backend = ops.resolve_backend(backend, self.device)  # validates the name too
        self.prediction = layout.PREDICTIONS[prediction]
        self.x_T = reference.gaussian(seed, shape, step=0, stream=layout.STREAM_X_T, device=self.device)
        self.seed = torch.tensor([seed, 0], dtype=torch.int64, device=self.device)
        self.call = trajectory.ModelCall(model)
        self.calls = 0
        self.on_call = None  # progress: called once per model call

    def model(self, x, t, k, kwargs):
        """The loop's model (``Plan.model``): ``ModelCall`` plus a call count for the progress bar."""
        self.calls += 1
        if self.on_call is not None:
            self.on_call()
        return self.call(x, t, k, kwargs)

    def probe(self) -> None:
        """One call at t = T - 1 on x_T: a model that rejects the shape fails here, before any work."""
        t = torch.full((self.shape[0],), self.schedule.T - 1, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            self.model(self.x_T, t, 0, self.kwargs)

    def run(self, st: solvers.SolverTable, tau, *, record: bool = False):
        """x_0 of the solver along tau; with record, the ``trajectory.Trajectory`` (every state
        and x0-prediction, noisiest first)."""
        plan = self._plan(st, tau)
        bufs = trajectory.allocate(plan, self.x_T, record)
        trajectory.run(plan, bufs)
        trajectory.check_finite(plan, bufs, self.x_T)
        return trajectory.result(plan, bufs, copy=False)

    def last_calls(self, st: solvers.SolverTable, tau):
        """The solver along tau up to its last call, then ``finish(t)``: x_0 with the last call told
        timestep t (one model call; the last row run by the same op on copies of the ring and the
        saved state, so any number of t share the first S - 1 calls)."""
        plan = self._plan(st, tau)
        S = plan.steps
        bufs = trajectory.allocate(plan, self.x_T, False)
        trajectory.run(plan, bufs, stop=S - 1)
        trajectory.check_finite(plan, bufs, self.x_T)
        step = ops.step_impl(plan.backend)
        x = bufs.xs[0]

        def finish(t: int) -> torch.Tensor:
            hist = None if bufs.history is None else bufs.history.clone()
            saved = None if bufs.saved is None else bufs.saved.clone()
            out, flags = torch.empty_like(x), torch.zeros_like(bufs.flags)
            with torch.inference_mode():
                m = self.model(x, torch.full((x.shape[0],), int(t), dtype=torch.int64, device=self.device), S - 1, self.kwargs)
                step(x, m, plan.table, S - 1, plan.seed, plan.prediction, plan.clip, plan.history_kind, hist, saved, None, out,
                     None, flags)  # fmt: skip
            if bool(flags.any()):
                return None  # the model or the state is not finite with this t: not a candidate
            return out

        return finish

    def _plan(self, st: solvers.SolverTable, tau) -> trajectory.Plan:
        t_host = np.asarray(tau, dtype=np.int64)[::-1].copy()
        return trajectory.Plan(
            kind="tune", table=st.table.to(torch.float32).to(self.device).contiguous(), history_kind=st.history_kind,
            history_slots=st.history_slots, uses_saved=st.uses_saved,
            timesteps=torch.as_tensor(t_host, device=self.device)[:, None].expand(-1, self.shape[0]).contiguous(),
            t_host=t_host, prediction=self.prediction, clip=0.0, seed=self.seed, noise=None, model=self.model,
            model_kwargs=self.kwargs, autocast_dtype=None, backend=self.backend, table_key=(), model_key=(),
        )  # fmt: skip


def _check_int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: expected an integer in {rng}, got {value!r}")
    return int(value)


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def _log_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """The geometric mean over the batch of each sample's RMS error: exp(mean_i log rms_i).

    Scale-free per sample: halving a 0.01 error counts as much as halving a 1.0 error, so a few
    samples that change mode (errors of the order of the data's range) no longer outweigh every
    sample's fine structure. On the sharp mixture (mode std 0.05, docs/results/quality.md) the RMS
    objective keeps the smallest timestep near t = 70, where the last x0-prediction collapses each
    mode to ~20% of its width (score 0.63 at S = 5); this one moves it to t ~ 2-8.
    """
    d = (a.double() - b.double()).reshape(a.shape[0], -1)
    return float(d.pow(2).mean(1).clamp_min(1e-30).log().mean().mul(0.5).exp())


# loss name -> (x, reference) -> float: what the dynamic program and the search minimise.
LOSSES = {"rms": _rms, "log": _log_rms}

# shift_last=True: the last call's model timestep t' is searched over sigmabar(t') = sigmabar(t) e^u,
# u on a coarse grid, then on a fine one around the coarse best (t' rounded; u = 0 is t itself).
_SHIFT_COARSE = np.arange(-3.0, 0.5001, 0.25)
_SHIFT_FINE = np.arange(-0.25, 0.2501, 0.05)


def _shifted_timestep(log_sigmabar: np.ndarray, t: int, u: float) -> int:
    """The timestep whose sigmabar is nearest e^u sigmabar(t) (in log), clamped to [0, T)."""
    target = log_sigmabar[t] + u
    return int(np.clip(np.rint(np.interp(target, log_sigmabar, np.arange(len(log_sigmabar), dtype=np.float64))), 0,
                       len(log_sigmabar) - 1))  # fmt: skip


def _dp_path(cost: np.ndarray, S: int) -> list:
    """GITS' dynamic program: cost[i, j] for a jump from grid node i to j > i (node G - 1 = the end,
    alpha = 1); the cheapest path of exactly S jumps from node 0, as the list of its S start nodes."""
    G = cost.shape[0]
    best = np.full((S + 1, G), np.inf)
    prev = np.zeros((S + 1, G), dtype=np.int64)
    best[0, 0] = 0.0
    for s in range(1, S + 1):
        total = best[s - 1][:, None] + cost  # (from, to)
        prev[s] = np.argmin(total, axis=0)  # the first minimum: ties keep the noisier start
        best[s] = total[prev[s], np.arange(G)]
    path, node = [], G - 1
    for s in range(S, 0, -1):
        node = int(prev[s, node])
        path.append(node)
    return path[::-1]


def tune_timesteps(
    model,
    steps: int,
    shape: Sequence[int],
    schedule: Optional[NoiseSchedule] = None,
    solver: str = "ipndm",
    seed: int = 0,
    model_kwargs: Optional[Dict[str, Any]] = None,
    *,
    progress: bool = True,
    grid: int = 80,
    teacher_steps: int = 200,
    refine: bool = True,
    max_trials: Optional[int] = None,
    prediction: str = "epsilon",
    backend: str = "auto",
    loss: str = "rms",
    shift_last: bool = False,
    info: Optional[Dict[str, Any]] = None,
) -> torch.Tensor:
    """Timesteps for ``FusedSampler(model, schedule, steps=steps, solver=solver, skip=<these>)``,
    tuned on one batch of ``shape`` drawn from ``seed`` (module docstring: GITS + local search).

    Returns an increasing int64 tensor of ``steps`` distinct timesteps in [0, T) (the first step,
    at the largest, starts from x_T).
    Options: ``grid`` candidate timesteps (the union of log-SNR and Karras spacings of that
    size), ``teacher_steps`` of the reference trajectory, ``refine``/``max_trials`` for the local
    search (each trial costs ``steps`` model calls), ``prediction`` of the model, ``backend`` of
    the op, ``loss``: what is minimised against the teacher, "rms" (the RMS error over the batch)
    or "log" (the geometric mean of the samples' RMS errors, ``_log_rms``: for data with fine
    structure, docs/results/quality.md). ``shift_last``: search the last call's model timestep
    too (module docstring, step 4; ~2.5-4x the model calls); the result, paired with the returned
    timesteps, is ``info["model_timesteps"]``, for ``FusedSampler(model_timesteps=...)``.
    ``info``, when a dict, receives how the tuning went (errors before/after, seconds, model
    calls, the model's timesteps) for ``save_tuned``.
    """
    t_start = time.perf_counter()
    schedule = NoiseSchedule.linear(1000) if schedule is None else schedule
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule: expected a NoiseSchedule or None, got {type(schedule).__name__}")
    T = schedule.T
    S = _check_int("steps", steps, 1, T)
    if solver not in solvers.BUILDERS:
        raise ValueError(f"solver: expected one of {solvers.SOLVERS}, got {solver!r}")
    try:
        solvers.build(solver, schedule, solvers.timesteps(schedule, S, "logsnr"))
    except ValueError as e:
        raise ValueError(f"solver: {solver!r} cannot be tuned here ({e})") from e
    if solver == "dpmpp_2m_sde":
        raise ValueError("solver: 'dpmpp_2m_sde' is stochastic and has no single ODE trajectory to tune against; tune 'dpmpp_2m'")
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {tuple(LOSSES)}, got {loss!r}")
    _loss = LOSSES[loss]
    if prediction not in layout.PREDICTIONS:
        raise ValueError(f"prediction: expected one of {tuple(layout.PREDICTIONS)}, got {prediction!r}")
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as e:
        raise ValueError(f"shape: expected a sequence of ints (B, ...), got {shape!r}") from e
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape: expected positive sizes with a leading batch dimension, got {shape}")
    G = _check_int("grid", grid, 4, T)
    teacher_steps = _check_int("teacher_steps", teacher_steps, 1, T)
    if max_trials is None:  # the "log" loss searches from coarser moves (_DELTAS): twice the trials
        max_trials = 120 if loss == "log" else 60
    max_trials = _check_int("max_trials", max_trials, 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed!r}")
    seed = int(seed)

    if not isinstance(shift_last, bool):
        raise ValueError(f"shift_last: expected True or False, got {shift_last!r}")
    runner = _Runner(model, schedule, shape, seed, model_kwargs, prediction, backend)
    try:
        runner.probe()
    except Exception as e:  # the model's own error for this shape, whatever its type
        raise ValueError(f"shape: the model rejects input of shape {shape} ({type(e).__name__}: {e})") from e

    # Candidate grid (increasing, T - 1 included) and the teacher's timesteps, a superset of it.
    cand = np.union1d(solvers.logsnr_timesteps(schedule, min(G, T)), solvers.karras_timesteps(schedule, min(G, T)))
    fine = np.union1d(cand, solvers.logsnr_timesteps(schedule, max(min(teacher_steps, T), 1)))
    n_trials = max_trials if refine else 0
    per_trial = S - 1 + len(_SHIFT_COARSE) + len(_SHIFT_FINE) if shift_last else S  # model calls, at most
    total = len(fine) + (1 + len(START_SPACINGS) + n_trials) * per_trial
    bar = _progress(total, progress, f"tune {solver} S={S}")
    try:
        runner.on_call = lambda: bar.update(1)
        teacher = runner.run(solvers.build("dpmpp_3m", schedule, fine), fine, record=True)
        x0_star = teacher.x0
        at = {int(t): i for i, t in enumerate(fine[::-1].tolist())}  # timestep -> teacher step
        a = schedule.alphas_cumprod
        log_sbar = (0.5 * (torch.log1p(-a) - torch.log(a))).numpy()  # log sigmabar, increasing in t
        nodes = cand[::-1]  # noisiest first; node G_c = the end (alpha = 1)
        Gc = len(nodes)
        X = [teacher.xs[at[int(t)]].double() for t in nodes] + [x0_star.double()]
        X0 = [teacher.x0_preds[at[int(t)]].double() for t in nodes]
        sa = [math.sqrt(float(a[int(t)])) for t in nodes] + [1.0]
        s1m = [math.sqrt(1.0 - float(a[int(t)])) for t in nodes] + [0.0]
        cost = np.full((Gc + 1, Gc + 1), np.inf)
        for i in range(Gc):
            eps_i = (X[i] - sa[i] * X0[i]) / s1m[i]
            for j in range(i + 1, Gc + 1):  # one DDIM step i -> j from the teacher's state
                cost[i, j] = _loss(sa[j] * X0[i] + s1m[j] * eps_i, X[j])
        dp = sorted(int(nodes[i]) for i in _dp_path(cost, S))

        def error(tau):
            """(the loss of the solver along tau against x0*, the last call's model timestep)."""
            st = solvers.build(solver, schedule, tau)
            t_last = int(tau[0])
            if not shift_last:
                return _loss(runner.run(st, tau), x0_star), t_last
            finish, tried = runner.last_calls(st, tau), {}

            def at(u):
                t = _shifted_timestep(log_sbar, t_last, float(u))
                if t not in tried:
                    out = finish(t)
                    tried[t] = math.inf if out is None else _loss(out, x0_star)
                return tried[t]

            coarse = min(_SHIFT_COARSE, key=lambda u: (at(u), abs(u)))
            for u in coarse + _SHIFT_FINE:
                at(u)
            t_best = min(tried, key=lambda t: (tried[t], abs(t - t_last)))  # ties: the smaller shift
            if not math.isfinite(tried[t_last]):
                runner.run(st, tau)  # not finite at the solver's own timestep: the loop's own error, naming it
            return tried[t_best], t_best

        starts = {"gits_dp": np.asarray(dp, dtype=np.int64)}
        for name in START_SPACINGS:
            starts[name] = solvers.timesteps(schedule, S, name)
        fits = {name: error(tau) for name, tau in starts.items()}
        errors = {name: fit[0] for name, fit in fits.items()}
        start_name = min(errors, key=lambda k: (errors[k], k != "gits_dp"))
        best, (best_err, best_t) = starts[start_name].copy(), fits[start_name]
        trials = 0
        if refine and S >= 2:
            pos = {int(t): i for i, t in enumerate(cand.tolist())}
            for delta in _DELTAS[loss]:
                improved = True
                while improved and trials < n_trials:
                    improved = False
                    for i in range(S):
                        for sign in (-1, 1):
                            if trials >= n_trials:
                                break
                            cur = int(best[i])
                            ci = pos.get(cur, int(np.searchsorted(cand, cur)))
                            ni = ci + sign * delta
                            if not 0 <= ni < len(cand):
                                continue
                            t_new = int(cand[ni])
                            lo = int(best[i - 1]) if i > 0 else -1
                            hi = int(best[i + 1]) if i + 1 < S else T
                            if not lo < t_new < hi:
                                continue
                            trial = best.copy()
                            trial[i] = t_new
                            trials += 1
                            e, t_model = error(trial)
                            if e < best_err:
                                best, best_err, best_t, improved = trial, e, t_model, True
        bar.update(total - bar.n)
    finally:
        bar.close()
    model_t = best.copy()
    model_t[0] = best_t
    if info is not None:
        info.update(
            method="GITS dynamic program (Chen et al. 2024) + coordinate descent on the solver's error to the teacher"
            + ("; the last call's model timestep searched with each candidate (LD3's decoupled timestep)" if shift_last else ""),
            model_timesteps=[int(t) for t in model_t],
            seed=int(seed), batch=list(shape), loss=loss, teacher="dpmpp_3m", teacher_steps=int(len(fine)), grid=int(len(cand)),
            start=start_name, start_errors={k: float(v) for k, v in errors.items()}, error_before=float(errors[start_name]),
            error_after=float(best_err), trials=int(trials), model_calls=int(runner.calls),
            seconds=round(time.perf_counter() - t_start, 3),
        )  # fmt: skip
    return torch.as_tensor(best, dtype=torch.int64)


class _NoBar:
    n = 0

    def update(self, k=1):
        self.n += k

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="call", leave=False)


# --------------------------------------------------------------------------------------------
# the file format: what was tuned for which model, schedule and solver
# --------------------------------------------------------------------------------------------


def schedule_digest(schedule: NoiseSchedule) -> str:
    """First 16 hex digits of a SHA-256 over the float64 alphas_cumprod."""
    a = schedule.alphas_cumprod.to(torch.float64).contiguous().numpy()
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]


def _schedule_record(schedule: NoiseSchedule) -> Dict[str, Any]:
    return {"name": getattr(schedule, "name", "custom"), "T": int(schedule.T), "alphas_cumprod_sha256": schedule_digest(schedule)}


def save_tuned(path, timesteps, *, model, schedule: NoiseSchedule, solver: str, steps: int, info: Dict[str, Any],
               model_timesteps=None) -> None:
    """Write tuned timesteps and what they were tuned for to ``path`` (JSON, atomically); with
    ``model_timesteps`` (``info["model_timesteps"]`` of ``shift_last=True``) other than the
    timesteps, those too, in format /2."""
    from ddim_fast.data import atomic_write_bytes
    from ddim_fast.nn import model_fingerprint

    tau = np.asarray(torch.as_tensor(timesteps).cpu(), dtype=np.int64)
    if tau.ndim != 1 or len(tau) != steps or (np.diff(tau) <= 0).any() or tau[0] < 0 or tau[-1] >= schedule.T:
        raise ValueError(f"timesteps: expected {steps} increasing timesteps in [0, {schedule.T}), got {tau.tolist()}")
    if solver not in solvers.BUILDERS:
        raise ValueError(f"solver: expected one of {solvers.SOLVERS}, got {solver!r}")
    model_tau = solvers.model_timesteps(model_timesteps, tau, schedule.T)
    if np.array_equal(model_tau, tau):
        model_tau = None
    record = {
        "format": FORMAT if model_tau is None else FORMAT_MODEL_TIMESTEPS,
        "model": model_fingerprint(model),
        "schedule": _schedule_record(schedule),
        "solver": solver,
        "steps": int(steps),
        "timesteps": tau.tolist(),
        "info": dict(info),
    }
    if model_tau is not None:
        record["model_timesteps"] = model_tau.tolist()
    atomic_write_bytes(os.fspath(path), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def load_tuned(path, *, model=None, schedule: Optional[NoiseSchedule] = None, solver: Optional[str] = None,
               with_model_timesteps: bool = False):
    """The increasing int64 timesteps of a ``save_tuned`` file, refused (ValueError naming the path
    and what differs) when it was tuned for another model, schedule or solver than those given;
    ``with_model_timesteps=True``: (timesteps, the model's timesteps paired with them); without
    it, a file whose model is told other timesteps (``shift_last``) is refused rather than run
    without them."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such tuned-timesteps file (write one with 'ddim-fast tune --out {path}')") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable tuned-timesteps JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict) or record.get("format") not in FORMATS:
        raise ValueError(f"{path}: not a tuned-timesteps file (expected format {FORMAT!r} or {FORMAT_MODEL_TIMESTEPS!r})")
    try:
        tau = np.asarray(record["timesteps"], dtype=np.int64)
        T = int(record["schedule"]["T"])
        ok = tau.ndim == 1 and len(tau) == int(record["steps"]) and len(tau) >= 1
        ok = ok and bool((np.diff(tau) > 0).all()) and tau[0] >= 0 and tau[-1] < T
        model_tau = tau
        if record["format"] == FORMAT_MODEL_TIMESTEPS:
            model_tau = np.asarray(record["model_timesteps"], dtype=np.int64)
            ok = ok and model_tau.shape == tau.shape and bool((model_tau >= 0).all() and (model_tau < T).all())
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: corrupt tuned-timesteps file (timesteps, steps or schedule missing or inconsistent)")
    differs = []
    if model is not None:
        from ddim_fast.nn import model_fingerprint

        fp = model_fingerprint(model)
        if fp != record.get("model"):
            differs.append(f"model fingerprint {record.get('model')} in the file, {fp} given")
    if schedule is not None:
        want = _schedule_record(schedule)
        have = record["schedule"]
        if (have.get("T"), have.get("alphas_cumprod_sha256")) != (want["T"], want["alphas_cumprod_sha256"]):
            differs.append(f"schedule {have.get('name')} T={have.get('T')} ({have.get('alphas_cumprod_sha256')}) in the file, "
                           f"{want['name']} T={want['T']} ({want['alphas_cumprod_sha256']}) given")  # fmt: skip
    if solver is not None and solver != record.get("solver"):
        differs.append(f"solver {record.get('solver')!r} in the file, {solver!r} given")
    if differs:
        raise ValueError(f"{path}: tuned for another setup: " + "; ".join(differs) + " (re-run 'ddim-fast tune')")
    if with_model_timesteps:
        return tau, model_tau
    if not np.array_equal(tau, model_tau):
        raise ValueError(f"{path}: the model is told other timesteps than these (tuned with shift_last); read them with "
                         "load_tuned(..., with_model_timesteps=True) and pass FusedSampler(skip=..., model_timesteps=...)")
    return tau
