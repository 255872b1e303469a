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

__all__ = ["tune_timesteps", "save_tuned", "load_tuned", "schedule_digest", "FORMAT"]

FORMAT = "ddim_fast.tuned_timesteps/1"
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
        t_host = np.asarray(tau, dtype=np.int64)[::-1].copy()
        plan = trajectory.Plan(
            kind="tune", table=st.table.to(torch.float32).to(self.device).contiguous(), history_kind=st.history_kind,
            history_slots=st.history_slots, uses_saved=st.uses_saved,
            timesteps=torch.as_tensor(t_host, device=self.device)[:, None].expand(-1, self.shape[0]).contiguous(),
            t_host=t_host, prediction=self.prediction, clip=0.0, seed=self.seed, noise=None, model=self.model,
            model_kwargs=self.kwargs, autocast_dtype=None, backend=self.backend, table_key=(), model_key=(),
        )  # fmt: skip
        bufs = trajectory.allocate(plan, self.x_T, record)
        trajectory.run(plan, bufs)
        trajectory.check_finite(plan, bufs, self.x_T)
        return trajectory.result(plan, bufs, copy=False)


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
    structure, docs/results/quality.md). ``info``, when a dict, receives how the tuning went
    (errors before/after, seconds, model calls) for ``save_tuned``.
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

    runner = _Runner(model, schedule, shape, seed, model_kwargs, prediction, backend)
    try:
        runner.probe()
    except Exception as e:  # the model's own error for this shape, whatever its type
        raise ValueError(f"shape: the model rejects input of shape {shape} ({type(e).__name__}: {e})") from e

    # Candidate grid (increasing, T - 1 included) and the teacher's timesteps, a superset of it.
    cand = np.union1d(solvers.logsnr_timesteps(schedule, min(G, T)), solvers.karras_timesteps(schedule, min(G, T)))
    fine = np.union1d(cand, solvers.logsnr_timesteps(schedule, max(min(teacher_steps, T), 1)))
    n_trials = max_trials if refine else 0
    total = len(fine) + len(START_SPACINGS) * S + n_trials * S
    bar = _progress(total, progress, f"tune {solver} S={S}")
    try:
        runner.on_call = lambda: bar.update(1)
        teacher = runner.run(solvers.build("dpmpp_3m", schedule, fine), fine, record=True)
        x0_star = teacher.x0
        at = {int(t): i for i, t in enumerate(fine[::-1].tolist())}  # timestep -> teacher step
        a = schedule.alphas_cumprod
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

        def error(tau) -> float:
            st = solvers.build(solver, schedule, tau)
            return _loss(runner.run(st, tau), x0_star)

        starts = {"gits_dp": np.asarray(dp, dtype=np.int64)}
        for name in START_SPACINGS:
            starts[name] = solvers.timesteps(schedule, S, name)
        errors = {"gits_dp": error(starts["gits_dp"])}
        for name in START_SPACINGS:
            errors[name] = error(starts[name])
        start_name = min(errors, key=lambda k: (errors[k], k != "gits_dp"))
        best, best_err = starts[start_name].copy(), errors[start_name]
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
                            e = error(trial)
                            if e < best_err:
                                best, best_err, improved = trial, e, True
        bar.update(total - bar.n)
    finally:
        bar.close()
    if info is not None:
        info.update(
            method="GITS dynamic program (Chen et al. 2024) + coordinate descent on the solver's RMS error to the teacher",
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


def save_tuned(path, timesteps, *, model, schedule: NoiseSchedule, solver: str, steps: int, info: Dict[str, Any]) -> None:
    """Write tuned timesteps and what they were tuned for to ``path`` (JSON, atomically)."""
    from ddim_fast.data import atomic_write_bytes
    from ddim_fast.nn import model_fingerprint

    tau = np.asarray(torch.as_tensor(timesteps).cpu(), dtype=np.int64)
    if tau.ndim != 1 or len(tau) != steps or (np.diff(tau) <= 0).any() or tau[0] < 0 or tau[-1] >= schedule.T:
        raise ValueError(f"timesteps: expected {steps} increasing timesteps in [0, {schedule.T}), got {tau.tolist()}")
    if solver not in solvers.BUILDERS:
        raise ValueError(f"solver: expected one of {solvers.SOLVERS}, got {solver!r}")
    record = {
        "format": FORMAT,
        "model": model_fingerprint(model),
        "schedule": _schedule_record(schedule),
        "solver": solver,
        "steps": int(steps),
        "timesteps": tau.tolist(),
        "info": dict(info),
    }
    atomic_write_bytes(os.fspath(path), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def load_tuned(path, *, model=None, schedule: Optional[NoiseSchedule] = None, solver: Optional[str] = None) -> np.ndarray:
    """The increasing int64 timesteps of a ``save_tuned`` file, refused (ValueError naming the path
    and what differs) when it was tuned for another model, schedule or solver than those given."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such tuned-timesteps file (write one with 'ddim-fast tune --out {path}')") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable tuned-timesteps JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tuned-timesteps file (expected format {FORMAT!r})")
    try:
        tau = np.asarray(record["timesteps"], dtype=np.int64)
        T = int(record["schedule"]["T"])
        ok = tau.ndim == 1 and len(tau) == int(record["steps"]) and len(tau) >= 1
        ok = ok and bool((np.diff(tau) > 0).all()) and tau[0] >= 0 and tau[-1] < T
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
    return tau
