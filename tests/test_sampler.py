"""FusedSampler end to end: against diffusers' DDIMScheduler, the original DDIM code, and closed form."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from _utils import assert_close
from ddim_fast import FusedSampler, NoiseSchedule, Trajectory, slerp
from ddim_fast.reference import GaussianMixtureEps

SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
}


def gmm_model(schedule, shape=(3, 4, 4), K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = int(np.prod(shape))
    means = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.7
    return GaussianMixtureEps(schedule.alphas_cumprod, means, stds=[0.3, 0.5, 0.4][:K])


class AsV(torch.nn.Module):
    """Turns an epsilon model into the v-prediction model of the same process: v = (eps - sqrt(1-a) x) / sqrt(a)."""

    def __init__(self, eps_model):
        super().__init__()
        self.eps_model = eps_model

    def forward(self, x, t):
        a = self.eps_model.alphas_cumprod[t][:, None, None, None].float()
        return (self.eps_model(x, t) - (1 - a).sqrt() * x) / a.sqrt()


class AsX0(AsV):
    def forward(self, x, t):
        a = self.eps_model.alphas_cumprod[t][:, None, None, None].float()
        return (x - (1 - a).sqrt() * self.eps_model(x, t)) / a.sqrt()


def diffusers_loop(model, scheduler, x, eta=0.0, noise=None):
    x = x.clone()
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            out = model(x, t.expand(x.shape[0]))
            variance_noise = noise[k] if noise is not None else None
            x = scheduler.step(out, t, x, eta=eta, variance_noise=variance_noise).prev_sample
    return x


def make_scheduler(name, S, prediction_type="epsilon"):
    sch = DDIMScheduler(
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=0,
        set_alpha_to_one=True,
        clip_sample=False,
        prediction_type=prediction_type,
        **SCHEDULES[name],
    )
    sch.set_timesteps(S)
    return sch


@pytest.mark.parametrize("schedule_name", ["linear", "scaled_linear"])
@pytest.mark.parametrize("S", [10, 50, 100])
@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_eta0_equals_diffusers_ddim(schedule_name, S, prediction, step_backend):
    sch = make_scheduler(schedule_name, S, {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction])
    schedule = NoiseSchedule.from_betas(sch.betas)
    eps_model = gmm_model(schedule)
    model = {"epsilon": eps_model, "v": AsV(eps_model), "x0": AsX0(eps_model)}[prediction]
    x_T = torch.randn(4, 3, 4, 4)
    expected = diffusers_loop(model, sch, x_T)
    ours = FusedSampler(model, schedule, steps=S, eta=0.0, prediction=prediction, precision="fp32", backend=step_backend)
    assert_close(ours.sample(x_T), expected, atol=2e-5, rtol=2e-5, what=f"{prediction} S={S} {step_backend}")


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("S", [20, 50])
def test_eta_positive_equals_diffusers_with_same_noise(eta, S, step_backend):
    sch = make_scheduler("linear", S)
    schedule = NoiseSchedule.from_betas(sch.betas)
    model = gmm_model(schedule)
    x_T = torch.randn(4, 3, 4, 4)
    noise = torch.randn(S, 4, 3, 4, 4)
    expected = diffusers_loop(model, sch, x_T, eta=eta, noise=noise)
    ours = FusedSampler(model, schedule, steps=S, eta=eta, precision="fp32", backend=step_backend).sample(x_T, noise=noise)
    assert_close(ours, expected, atol=2e-5, rtol=2e-5, what=f"eta={eta} S={S} {step_backend}")


def original_generalized_steps(x, seq, model, b, eta=0.0, noise=None):
    """A transcription of the original DDIM code's ``generalized_steps`` (functions/denoising.py)."""

    def compute_alpha(beta, t):
        beta = torch.cat([torch.zeros(1, dtype=beta.dtype), beta], dim=0)
        return (1 - beta).cumprod(dim=0).index_select(0, t + 1).view(-1, 1, 1, 1)

    n = x.size(0)
    seq_next = [-1] + list(seq[:-1])
    xs = [x]
    for k, (i, j) in enumerate(zip(reversed(seq), reversed(seq_next))):
        t = torch.ones(n, dtype=torch.long) * i
        next_t = torch.ones(n, dtype=torch.long) * j
        at = compute_alpha(b, t).float()
        at_next = compute_alpha(b, next_t).float()
        xt = xs[-1]
        et = model(xt, t)
        x0_t = (xt - et * (1 - at).sqrt()) / at.sqrt()
        c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1**2).sqrt()
        z = noise[k] if noise is not None else torch.zeros_like(x)
        xs.append(at_next.sqrt() * x0_t + c1 * z + c2 * et)
    return xs[-1]


@pytest.mark.parametrize("skip, S", [("uniform", 20), ("uniform", 30), ("quad", 100)])
def test_eta0_equals_original_generalized_steps(skip, S, step_backend):
    """Including T % S != 0 (range() runs more steps) and "quad" duplicates (identity steps there)."""
    schedule = NoiseSchedule.linear(1000)
    model = gmm_model(schedule)
    if skip == "uniform":
        seq = list(range(0, 1000, 1000 // S))
    else:
        seq = [int(s) for s in np.linspace(0, np.sqrt(1000 * 0.8), S) ** 2]
    x_T = torch.randn(3, 3, 4, 4)
    expected = original_generalized_steps(x_T, seq, model, schedule.betas)
    sampler = FusedSampler(model, schedule, steps=S, skip=skip, precision="fp32", backend=step_backend)
    assert sampler.num_steps == len(set(seq))
    assert_close(sampler.sample(x_T), expected, atol=5e-5, rtol=5e-5, what=f"{skip} S={S}")


def test_eta1_equals_original_generalized_steps_with_noise(step_backend):
    schedule = NoiseSchedule.linear(1000)
    model = gmm_model(schedule)
    seq = list(range(0, 1000, 50))
    x_T = torch.randn(3, 3, 4, 4)
    noise = torch.randn(len(seq), 3, 3, 4, 4)
    expected = original_generalized_steps(x_T, seq, model, schedule.betas, eta=1.0, noise=noise)
    ours = FusedSampler(model, schedule, steps=20, eta=1.0, precision="fp32", backend=step_backend).sample(x_T, noise=noise)
    assert_close(ours, expected, atol=5e-5, rtol=5e-5, what=step_backend)


# -- closed form: a Gaussian mixture whose optimal epsilon is a formula --------------------------------


@pytest.fixture(scope="module")
def mixture_1d():
    schedule = NoiseSchedule.linear(1000)
    model = GaussianMixtureEps(schedule.alphas_cumprod, [[-1.5], [1.0]], stds=[0.3, 0.5], weights=[0.4, 0.6])
    return schedule, model


def moment_errors(model, x):
    mean, cov = model.data_moments()
    x = x.double().reshape(x.shape[0], -1)
    return (x.mean(0) - mean).abs().max().item(), (x.var(0) - torch.diagonal(cov)).abs().max().item()


def test_ddim_converges_to_data_distribution_as_S_grows(mixture_1d):
    schedule, model = mixture_1d
    errs = []
    for S in (5, 20, 100):
        x = FusedSampler(model, schedule, steps=S, eta=0.0, precision="fp32").sample(shape=(20000, 1), seed=3)
        errs.append(moment_errors(model, x))
    var_errs = [e[1] for e in errs]
    assert var_errs[0] > var_errs[1] > var_errs[2], errs
    # at S = 100 the only error left is sampling error (var of 20000 draws: ~0.02)
    assert errs[2][0] < 0.04 and errs[2][1] < 0.06, errs


def test_ancestral_ddpm_eta1_full_T_recovers_moments(mixture_1d):
    schedule, model = mixture_1d
    x = FusedSampler(model, schedule, steps=1000, eta=1.0, precision="fp32").sample(shape=(8000, 1), seed=11)
    m_err, v_err = moment_errors(model, x)
    assert m_err < 0.06 and v_err < 0.12, (m_err, v_err)


def test_eta0_beats_eta1_at_small_S(mixture_1d):
    """The paper's Table 1 trend: at few steps, DDIM is closer to the data than DDPM."""
    schedule, model = mixture_1d
    e0 = moment_errors(model, FusedSampler(model, schedule, steps=10, eta=0.0, precision="fp32").sample(shape=(20000, 1), seed=5))
    e1 = moment_errors(model, FusedSampler(model, schedule, steps=10, eta=1.0, precision="fp32").sample(shape=(20000, 1), seed=5))
    assert e0[1] < e1[1], (e0, e1)


# -- encode / decode ---------------------------------------------------------------------------------


def test_encode_decode_roundtrip_error_falls_with_S():
    schedule = NoiseSchedule.linear(1000)
    model = gmm_model(schedule)
    x0 = model.sample_data(16, generator=torch.Generator().manual_seed(1)).float().reshape(16, 3, 4, 4)
    errs = []
    for S in (10, 50, 200):
        sampler = FusedSampler(model, schedule, steps=S, precision="fp32")
        x_T = sampler.encode(x0)
        errs.append(((sampler.decode(x_T) - x0) ** 2).mean().item())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 1e-3, errs


def test_encode_latent_is_gaussian_like():
    schedule = NoiseSchedule.linear(1000)
    model = gmm_model(schedule)
    x0 = model.sample_data(256).float().reshape(256, 3, 4, 4)
    x_T = FusedSampler(model, schedule, steps=100, precision="fp32").encode(x0)
    assert abs(x_T.mean().item()) < 0.1 and abs(x_T.std().item() - 1) < 0.1


def test_encode_rejects_eta():
    sampler = FusedSampler(lambda x, t: x, steps=10, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        sampler.encode(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="eta"):
        FusedSampler(lambda x, t: x, steps=10).encode(torch.zeros(1, 2), eta=1.0)
    sampler.encode(torch.zeros(1, 2), eta=0)  # explicit eta=0 is the deterministic inversion


# -- seeds, noise and batching ------------------------------------------------------------------------


def test_seeded_runs_are_reproducible_and_seed_matters():
    schedule = NoiseSchedule.linear(1000)
    model = gmm_model(schedule)
    s = FusedSampler(model, schedule, steps=10, eta=1.0, precision="fp32")
    a = s.sample(shape=(2, 3, 4, 4), seed=7)
    b = s.sample(shape=(2, 3, 4, 4), seed=7)
    c = s.sample(shape=(2, 3, 4, 4), seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sample_i_is_the_same_alone_in_a_batch_or_at_an_offset():
    schedule = NoiseSchedule.linear(1000)
    model = gmm_model(schedule)
    s = FusedSampler(model, schedule, steps=10, eta=1.0, precision="fp32")
    batch = s.sample(shape=(7, 3, 4, 4), seed=3)
    alone = s.sample(shape=(1, 3, 4, 4), seed=3, batch_offset=5)
    assert_close(alone[0], batch[5], atol=1e-5, rtol=1e-5)
    tail = s.sample(shape=(2, 3, 4, 4), seed=3, batch_offset=5)
    assert_close(tail, batch[5:7], atol=1e-5, rtol=1e-5)


def test_unseeded_runs_follow_torch_manual_seed():
    s = FusedSampler(gmm_model(NoiseSchedule.linear(1000)), steps=5, eta=1.0, precision="fp32")
    torch.manual_seed(1)
    a = s.sample(shape=(2, 3, 4, 4))
    torch.manual_seed(1)
    assert torch.equal(a, s.sample(shape=(2, 3, 4, 4)))


def test_caller_tensors_are_not_modified():
    schedule = NoiseSchedule.linear(1000)
    model = gmm_model(schedule)
    x_T = torch.randn(2, 3, 4, 4)
    noise = torch.randn(10, 2, 3, 4, 4)
    x_copy, n_copy = x_T.clone(), noise.clone()
    s = FusedSampler(model, schedule, steps=10, eta=1.0, precision="fp32")
    s.sample(x_T, noise=noise)
    s.decode(x_T)
    s.encode(x_T, eta=0)
    assert torch.equal(x_T, x_copy) and torch.equal(noise, n_copy)


# -- trajectories, model conventions, progress ----------------------------------------------------------


def test_return_trajectory():
    schedule = NoiseSchedule.linear(1000)
    model = gmm_model(schedule)
    s = FusedSampler(model, schedule, steps=10, precision="fp32")
    x_T = torch.randn(2, 3, 4, 4)
    traj = s.sample(x_T, return_trajectory=True)
    assert isinstance(traj, Trajectory)
    assert traj.xs.shape == (11, 2, 3, 4, 4) and traj.x0_preds.shape == (10, 2, 3, 4, 4)
    assert torch.equal(traj.xs[0], x_T) and torch.equal(traj.xs[-1], traj.x0)
    assert traj.timesteps.tolist() == s.timesteps.tolist()
    # the last step lands on alpha = 1: the output is the last x0-prediction
    assert_close(traj.x0, traj.x0_preds[-1], atol=1e-6)
    # the x0-prediction at step k is Eq. 12's "predicted x0" from x_t and eps
    a = schedule.alphas_cumprod[int(traj.timesteps[3])]
    eps = model(traj.xs[3], traj.timesteps[3].expand(2))
    assert_close(traj.x0_preds[3], (traj.xs[3] - (1 - a).sqrt() * eps) / a.sqrt(), atol=1e-5)
    assert torch.equal(traj.x0, s.sample(x_T))
    enc = s.encode(traj.x0, return_trajectory=True)
    assert enc.timesteps.tolist() == sorted(s.timesteps.tolist())


@pytest.mark.parametrize("wrap", ["tensor", "tuple", "dataclass", "dict", "learned_variance"])
def test_model_call_conventions(wrap):
    schedule = NoiseSchedule.linear(1000)
    base = gmm_model(schedule)

    class Out:
        def __init__(self, sample):
            self.sample = sample

    def model(x, t, scale=1.0):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],) and t.device == x.device
        e = base(x, t) * scale
        return {
            "tensor": e,
            "tuple": (e, None),
            "dataclass": Out(e),
            "dict": {"sample": e},
            "learned_variance": torch.cat([e, torch.zeros_like(e)], dim=1),
        }[wrap]

    x_T = torch.randn(2, 3, 4, 4)
    ref = FusedSampler(lambda x, t: base(x, t) * 0.5, schedule, steps=5, precision="fp32").sample(x_T)
    ours = FusedSampler(model, schedule, steps=5, precision="fp32", model_kwargs={"scale": 0.5}).sample(x_T)
    assert torch.equal(ours, ref)


def test_progress_bar(capsys):
    s = FusedSampler(gmm_model(NoiseSchedule.linear(1000)), steps=5, precision="fp32")
    s.sample(shape=(1, 3, 4, 4), seed=0, progress=True)
    assert "5/5" in capsys.readouterr().err


# -- errors ----------------------------------------------------------------------------------------------


def test_model_wrong_shape_names_step_and_timestep():
    s = FusedSampler(lambda x, t: x[:, :1], steps=10)
    with pytest.raises(ValueError, match=r"step 0 \(timestep 900\).*expected the input's shape"):
        s.sample(shape=(2, 3, 4, 4), seed=0)


def test_model_nan_names_step_and_timestep():
    def model(x, t):
        return torch.where(t[:, None] == 500, torch.full_like(x, float("nan")), torch.zeros_like(x))

    s = FusedSampler(model, steps=10, precision="fp32")
    with pytest.raises(FloatingPointError, match=r"step 4 \(timestep 500\)"):
        s.sample(shape=(2, 3), seed=0)


def test_model_returning_garbage_type():
    with pytest.raises(TypeError, match="model returned str"):
        FusedSampler(lambda x, t: "eps", steps=2).sample(shape=(1, 2), seed=0)


@pytest.mark.parametrize(
    "kwargs, call, match",
    [
        (dict(prediction="score"), None, "prediction"),
        (dict(skip="cubic"), None, "skip"),
        (dict(steps=0), None, "steps"),
        (dict(steps=1001), None, "steps"),
        (dict(eta=-1.0), None, "eta"),
        (dict(precision="fp8"), None, "precision"),
        (dict(backend="cuda"), None, "backend"),
        (dict(solver="euler"), None, "solver"),
        (dict(clip_x0=-1.0), None, "clip_x0"),
        (dict(cuda_graph="yes"), None, "cuda_graph"),
        ({}, dict(x_T=torch.zeros(2, 3, dtype=torch.long)), "x_T: expected a floating-point"),
        ({}, dict(x_T=torch.zeros(2, 3), shape=(2, 4)), "shape"),
        ({}, dict(shape=None), "shape"),
        ({}, dict(shape=(2, -3)), "shape"),
        ({}, dict(shape=(2, 3), seed=-1), "seed"),
        ({}, dict(shape=(2, 3), seed=1.5), "seed"),
        ({}, dict(shape=(2, 3), noise=torch.zeros(9, 2, 3)), r"noise: expected shape \(S=10"),
        ({}, dict(x_T=torch.full((2, 3), float("nan"))), "x_T: contains NaN"),
        ({}, dict(shape=(2, 3), batch_offset=-1), "batch_offset"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, call, match):
    with pytest.raises(ValueError, match=match):
        s = FusedSampler(lambda x, t: x, **{"steps": 10, **kwargs})
        s.sample(**(call or dict(shape=(2, 3), seed=0)))


def test_model_must_be_callable():
    with pytest.raises(TypeError, match="model"):
        FusedSampler(42)


# -- slerp ---------------------------------------------------------------------------------------------------


def test_slerp_endpoints_norm_and_angle():
    z1, z2 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    norm = lambda z: z.flatten(1).norm(dim=1)[:, None, None, None]  # noqa: E731
    z2 = z2 / norm(z2) * norm(z1)  # equal norms: the midpoint then bisects the angle exactly
    assert_close(slerp(z1, z2, 0.0), z1, atol=1e-6)
    assert_close(slerp(z1, z2, 1.0), z2, atol=1e-6)
    mid = slerp(z1, z2, 0.5)
    for i in range(2):
        a, b, m = z1[i].flatten().double(), z2[i].flatten().double(), mid[i].flatten().double()
        ang = lambda u, v: torch.arccos(torch.dot(u, v) / (u.norm() * v.norm()))  # noqa: E731
        assert ang(a, m).item() == pytest.approx(ang(m, b).item(), rel=1e-4)  # halfway along the arc
    # high-dimensional Gaussians are nearly orthogonal with equal norms: slerp keeps the norm, lerp does not
    assert mid.flatten(1).norm(dim=1).mean() > 0.9 * z1.flatten(1).norm(dim=1).mean()
    many = slerp(z1, z2, torch.linspace(0, 1, 5))
    assert many.shape == (5, 2, 3, 8, 8)
    assert_close(many[2], mid, atol=1e-6)


def test_slerp_parallel_and_errors():
    z = torch.randn(1, 10)
    assert_close(slerp(z, 2 * z, 0.5), 1.5 * z, atol=1e-6)
    with pytest.raises(ValueError, match="z2"):
        slerp(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)


# -- every backend, encode, and the defects of issue 17 that live in the sampler -------------------------


def test_encode_equals_float64_transcription_of_inversion(step_backend):
    """DDIM inversion (Eq. 12 with eta = 0 run up tau) written out in float64 from the alphas themselves."""
    schedule = NoiseSchedule.linear(1000)
    model = gmm_model(schedule)
    x0 = model.sample_data(3, generator=torch.Generator().manual_seed(2)).float().reshape(3, 3, 4, 4)
    sampler = FusedSampler(model, schedule, steps=10, precision="fp32", backend=step_backend)
    a = schedule.alphas_cumprod
    x, a_cur = x0.double(), torch.tensor(1.0, dtype=torch.float64)
    for t in sampler.timesteps.flip(0).tolist():
        eps = model(x.float(), torch.full((3,), t)).double()
        x0_pred = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        x = a[t].sqrt() * x0_pred + (1 - a[t]).sqrt() * eps
        a_cur = a[t]
    assert_close(sampler.encode(x0), x, atol=1e-4, rtol=1e-4, what=step_backend)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m"])
def test_one_step_sampling_decoding_and_explicit_single_timestep(solver):
    """S = 1 (issue 17, defect 1): one step from the noisiest timestep straight to alpha = 1, i.e.
    the x0-prediction at that timestep, whatever the solver."""
    schedule = NoiseSchedule.linear(1000)
    model = gmm_model(schedule)
    x_T = torch.randn(2, 3, 4, 4)
    for skip in ("uniform", [999], [500]):
        s = FusedSampler(model, schedule, steps=1, skip=skip, solver=solver, precision="fp32", backend="torch")
        t = int(s.timesteps[0])
        a = schedule.alphas_cumprod[t]
        expected = (x_T.double() - (1 - a).sqrt() * model(x_T, torch.full((2,), t)).double()) / a.sqrt()
        assert s.num_steps == 1
        tol = 1e-6 / float(a.sqrt())  # float32 rounding of x and eps, amplified by 1 / sqrt(alpha) (150x at t = 999)
        assert_close(s.sample(x_T), expected, atol=tol, rtol=tol, what=f"{skip}")
        assert_close(s.decode(x_T), expected, atol=tol, rtol=tol, what=f"{skip}")
        assert s.encode(expected.float()).shape == x_T.shape


def test_batch_offsets_past_2_to_the_32_draw_new_samples():
    """Issue 17, defect 4: the sample index is 48 bits wide, so sample 2**32 is not sample 0, and
    sample i is the same whether it is drawn across the 2**32 boundary or alone."""
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731  (x_T and the noise are all that matter)
    s = FusedSampler(model, steps=3, eta=1.0, precision="fp32", backend="torch")
    first = s.sample(shape=(1, 8), seed=5, batch_offset=0)
    wrapped = s.sample(shape=(1, 8), seed=5, batch_offset=2**32)
    assert not torch.equal(first, wrapped)
    across = s.sample(shape=(3, 8), seed=5, batch_offset=2**32 - 1)
    assert torch.equal(across[1:2], wrapped)
    assert torch.equal(across[0:1], s.sample(shape=(1, 8), seed=5, batch_offset=2**32 - 1))
    with pytest.raises(ValueError, match=r"batch_offset: the last sample index 281474976710656"):
        s.sample(shape=(2, 8), seed=5, batch_offset=2**48 - 1)
    with pytest.raises(ValueError, match="batch_offset"):
        s.sample(shape=(1, 8), seed=5, batch_offset=1.0)


@pytest.mark.parametrize("shape", [(2.5, 3), (2, 3.0), ("2", 3), (True, 3)])
def test_non_integer_shapes_are_rejected_not_truncated(shape):
    with pytest.raises(ValueError, match="shape"):
        FusedSampler(lambda x, t: x, steps=2).sample(shape=shape, seed=0)


def test_nan_in_explicit_noise_is_named_as_the_noise():
    s = FusedSampler(lambda x, t: torch.zeros_like(x), steps=4, eta=1.0, precision="fp32")
    noise = torch.randn(4, 2, 3)
    noise[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="noise: contains NaN"):
        s.sample(torch.randn(2, 3), noise=noise)


def test_overflowing_finite_state_is_not_blamed_on_the_model(step_backend):
    """Issue 17, defect 5: a finite x_T of 3e38 overflows float32 in the step; the model output is
    finite, so the error names the state and x_T, not the model."""
    s = FusedSampler(lambda x, t: torch.tanh(x), steps=4, precision="fp32", backend=step_backend)
    with pytest.raises(FloatingPointError, match=r"state became NaN or infinite at step 0 .*x_T \(max \|value\| 3e\+38\)"):
        s.sample(torch.full((2, 3), 3e38))


@pytest.mark.parametrize("betas", [[1e-30] * 10, [1 - 1e-3] * 1000])
def test_degenerate_schedule_is_named_before_sampling(betas):
    """betas so tiny that alpha = 1 (x0-prediction needs 1 / sqrt(1 - alpha)) or so close to 1 that
    alpha underflows (every model needs 1 / sqrt(alpha)): a schedule error, not a model NaN."""
    schedule = NoiseSchedule.from_betas(torch.tensor(betas, dtype=torch.float64))
    prediction = "x0" if betas[0] < 1e-3 else "epsilon"
    with pytest.raises(ValueError, match="schedule: "):
        FusedSampler(lambda x, t: x, schedule, steps=5, prediction=prediction)


def test_model_nan_names_step_and_timestep_on_every_backend(step_backend):
    def model(x, t):
        return torch.where(t[:, None] == 500, torch.full_like(x, float("nan")), torch.zeros_like(x))

    s = FusedSampler(model, steps=10, precision="fp32", backend=step_backend)
    with pytest.raises(FloatingPointError, match=r"model returned NaN or infinite values at step 4 \(timestep 500\)"):
        s.sample(shape=(2, 3), seed=0)


def test_strided_float32_output_is_not_rounded_through_low_precision():
    """Issue 17, defect 7: a learned-variance model's 2C output sliced to C is non-contiguous; under
    precision="bf16" its float32 eps must reach the step unrounded, as a contiguous output does."""
    schedule = NoiseSchedule.linear(1000)
    eps_model = gmm_model(schedule)

    def learned_variance(x, t):
        eps = eps_model(x.float(), t).float()
        return torch.cat([eps, torch.ones_like(eps)], dim=1)  # float32, whatever autocast says

    x_T = torch.randn(2, 3, 4, 4)
    kw = dict(steps=10, precision="bf16", backend="torch", channels_last=False)
    contiguous = FusedSampler(lambda x, t: eps_model(x.float(), t).float(), schedule, **kw).sample(x_T)
    strided = FusedSampler(learned_variance, schedule, **kw).sample(x_T)
    assert torch.equal(strided, contiguous)


def test_model_timesteps_tell_the_model_other_timesteps_than_the_solvers():
    """``model_timesteps`` (paired with the increasing skip timesteps) is what the model is told at
    each step of sample/decode, what ``return_trajectory`` reports, and part of nothing else: the
    coefficients stay tau's (a constant model gives the same x_0 whatever it is told), and encode
    keeps tau."""
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return torch.full_like(x, 0.25)

    tau, told = [10, 200, 400, 600, 999], [31, 200, 400, 600, 999]
    plain = FusedSampler(model, steps=5, skip=tau, solver="unipc", backend="torch")
    shifted = FusedSampler(model, steps=5, skip=tau, solver="unipc", backend="torch", model_timesteps=told)
    assert shifted.timesteps.tolist() == tau[::-1] and shifted.model_timesteps.tolist() == told[::-1]
    assert plain.model_timesteps.tolist() == tau[::-1]
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    a = plain.sample(x_T)
    seen.clear()
    traj = shifted.sample(x_T, return_trajectory=True)
    assert seen == told[::-1] and traj.timesteps.tolist() == told[::-1]
    torch.testing.assert_close(traj.x0, a, rtol=0, atol=0)
    seen.clear()
    shifted.decode(x_T)
    assert seen == told[::-1]
    seen.clear()
    shifted.encode(a)
    assert seen == tau


@pytest.mark.parametrize("bad", [[1, 2], "10,200", [1.5, 2, 3, 4, 5], [0, 0, 0, 0, 1000], [-1, 0, 0, 0, 0], [[1, 2, 3, 4, 5]]])
def test_bad_model_timesteps_raise_clearly(bad):
    with pytest.raises(ValueError, match=r"model_timesteps: expected a sequence of 5 integer timesteps in \[0, 1000\)"):
        FusedSampler(lambda x, t: x, steps=5, skip=[10, 200, 400, 600, 999], model_timesteps=bad)
