"""diffusers interoperability: schedules read from scheduler configs, and pipeline loops replaced."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

from _utils import assert_close, tiny_unet
from ddim_fast import FusedSampler, NoiseSchedule


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize(
    "kw",
    [
        dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(trained_betas=np.linspace(1e-4, 0.03, 500).tolist(), num_train_timesteps=500),
    ],
    ids=["linear", "scaled_linear", "cosine", "trained"],
)
def test_schedule_roundtrip(cls, kw):
    kw = {"num_train_timesteps": 1000, **kw}
    sch = cls(**kw)
    for source in (sch, sch.config, dict(sch.config)):
        ours = NoiseSchedule.from_diffusers(source)
        assert ours.T == sch.config.num_train_timesteps
        np.testing.assert_allclose(ours.betas.numpy(), sch.betas.double().numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(ours.alphas_cumprod.numpy(), sch.alphas_cumprod.double().numpy(), rtol=2e-5)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    ],
)
def test_unsupported_configs_rejected(cfg, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_diffusers({"num_train_timesteps": 1000, **cfg})
    with pytest.raises(TypeError, match="scheduler_or_config"):
        NoiseSchedule.from_diffusers(42)


@pytest.mark.parametrize(
    "sched_kw",
    [
        dict(),
        dict(steps_offset=1),
        dict(timestep_spacing="trailing"),
        dict(prediction_type="v_prediction"),
        dict(clip_sample=True),
    ],
    ids=["leading", "offset1", "trailing", "v", "clip"],
)
def test_from_diffusers_pipeline_equals_pipeline_loop(sched_kw):
    unet = tiny_unet()
    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True,
                        **{"clip_sample": False, **sched_kw})
    pipe = DDIMPipeline(unet=unet, scheduler=sch)
    S = 20
    x_T = torch.randn(2, 3, 8, 8)
    # what DDIMPipeline.__call__ does, minus the image post-processing
    sch.set_timesteps(S)

    def pipeline_loop(x):
        with torch.no_grad():
            for t in sch.timesteps:
                x = sch.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        return x

    expected = pipeline_loop(x_T.clone())
    # A random UNet with clipping is chaotic: a 1e-6 relative nudge of x_T moves diffusers' own
    # output by ~4e-4. The tolerance is scaled by that intrinsic sensitivity (1e-4 at least).
    sensitivity = (pipeline_loop(x_T * (1 + 1e-6)) - expected).abs().max().item()
    ours = FusedSampler.from_diffusers(pipe, steps=S, precision="fp32").sample(x_T)
    assert_close(ours, expected, atol=max(1e-4, 4 * sensitivity), rtol=1e-4)


def test_from_diffusers_needs_a_scheduler_for_a_bare_unet():
    with pytest.raises(ValueError, match="scheduler"):
        FusedSampler.from_diffusers(tiny_unet())
    s = FusedSampler.from_diffusers(tiny_unet(), DDPMScheduler(num_train_timesteps=1000), steps=10)
    assert s.num_steps == 10 and s.prediction == "epsilon"


def unet_loop(unet, sch, S):
    """(x_T, diffusers' own S-step loop of ``sch`` from it) for the tiny UNet."""
    sch.set_timesteps(S)
    x_T = torch.randn(2, 3, 8, 8)
    x = x_T.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(x, t).sample, t, x).prev_sample
    return x_T, x


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")  # diffusers'
@pytest.mark.parametrize(
    "sched_kw, S",
    [
        (dict(solver_order=2), 10),
        (dict(solver_order=2, timestep_spacing="leading"), 25),
        (dict(solver_order=2, timestep_spacing="trailing", prediction_type="v_prediction"), 10),
        (dict(solver_order=3), 12),
        (dict(solver_order=3, timestep_spacing="trailing"), 20),
        (dict(solver_order=1), 10),
    ],
    ids=["2m-linspace", "2m-leading", "2m-trailing-v", "3m-linspace", "3m-trailing", "order1"],
)
def test_from_diffusers_dpm_solver_equals_its_loop(sched_kw, S):
    """A DPMSolverMultistepScheduler (dpmsolver++) pipeline maps to our multistep solver on its own
    timesteps: same timesteps, same images as diffusers' loop, to float32 rounding."""
    unet = tiny_unet()
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", **sched_kw)
    pipe = DDPMPipeline(unet=unet, scheduler=sch)  # (DDIMPipeline would convert it to a DDIMScheduler)
    x_T, x = unet_loop(unet, sch, S)
    sampler = FusedSampler.from_diffusers(pipe, steps=S, precision="fp32")
    assert sampler.solver == {1: "ddim", 2: "dpmpp_2m", 3: "dpmpp_3m"}[sched_kw["solver_order"]]
    assert torch.equal(sampler.timesteps, sch.timesteps)
    assert_close(sampler.sample(x_T), x, atol=1e-5 * max(1.0, x.abs().max().item()), what=str(sched_kw))


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")  # diffusers'
def test_dpm_solver_lambda_min_clipped_timesteps():
    """The cosine schedule's usual lambda_min_clipped drops the last timesteps, as in diffusers."""
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
    for S in (10, 20, 50):
        sch.set_timesteps(S)
        s = FusedSampler.from_diffusers(tiny_unet(), sch, steps=S)
        assert torch.equal(s.timesteps, sch.timesteps), S


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type='dpmsolver'"),
        (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+'"),
        (dict(solver_type="heun"), "solver_type='heun'"),
        (dict(use_karras_sigmas=True), "use_karras_sigmas"),
        (dict(use_lu_lambdas=True), "logsnr"),
        (dict(final_sigmas_type="sigma_min"), "final_sigmas_type"),
        (dict(thresholding=True), "thresholding"),
        (dict(solver_order=3, lower_order_final=False), "lower_order_final"),
    ],
)
def test_unsupported_dpm_solver_configs_rejected(kw, match):
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, **kw)
    with pytest.raises(ValueError, match=match):
        FusedSampler.from_diffusers(tiny_unet(), sch, steps=10)


def test_other_schedulers_rejected_by_name():
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    for cls in (PNDMScheduler, EulerDiscreteScheduler):
        with pytest.raises(ValueError, match=f"{cls.__name__} is not supported"):
            FusedSampler.from_diffusers(tiny_unet(), cls(num_train_timesteps=1000), steps=10)
    # a saved config names its class
    with pytest.raises(ValueError, match="EulerDiscreteScheduler is not supported"):
        FusedSampler.from_diffusers(tiny_unet(), {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000})


@pytest.mark.parametrize(
    "sched_kw, S",
    [(dict(solver_order=2), 10), (dict(solver_order=3, timestep_spacing="trailing"), 12),
     (dict(solver_order=2, timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"), 8)],
    ids=["2-linspace", "3-trailing", "2-leading-v"],
)
def test_from_diffusers_unipc_equals_its_loop(sched_kw, S):
    """UniPCMultistepScheduler (bh2, predict_x0) maps to solver "unipc"/"unipc_3" on its own timesteps."""
    from diffusers import UniPCMultistepScheduler

    unet = tiny_unet()
    sch = UniPCMultistepScheduler(num_train_timesteps=1000, **sched_kw)
    x_T, x = unet_loop(unet, sch, S)
    sampler = FusedSampler.from_diffusers(unet, sch, steps=S, precision="fp32")
    assert sampler.solver == {2: "unipc", 3: "unipc_3"}[sched_kw["solver_order"]]
    assert torch.equal(sampler.timesteps, sch.timesteps)
    assert_close(sampler.sample(x_T), x, atol=1e-5 * max(1.0, x.abs().max().item()), what=str(sched_kw))


@pytest.mark.parametrize(
    "kw, match",
    [(dict(solver_type="bh1"), "solver_type='bh1'"), (dict(predict_x0=False), "predict_x0=False"),
     (dict(disable_corrector=[1]), "disable_corrector"), (dict(solver_order=1), "solver_order=1"),
     (dict(use_karras_sigmas=True), "use_karras_sigmas"), (dict(lower_order_final=False), "lower_order_final")],
)
def test_unsupported_unipc_configs_rejected(kw, match):
    from diffusers import UniPCMultistepScheduler

    with pytest.raises(ValueError, match=match):
        FusedSampler.from_diffusers(tiny_unet(), UniPCMultistepScheduler(num_train_timesteps=1000, **kw), steps=10)


def test_bare_config_dicts_recognised_by_their_keys():
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler

    from ddim_fast.compat import default_eta, scheduler_kind

    for cls in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, PNDMScheduler,
                EulerDiscreteScheduler):
        assert scheduler_kind(dict(cls().config), schedule_only=True) == cls.__name__
    assert default_eta(DDPMScheduler()) == 1.0 and default_eta(DDPMScheduler(variance_type="fixed_large")) == "ddpm_large"
    assert default_eta(DDIMScheduler()) == 0.0
