"""FusedScheduler: ddim_fast's fused step inside diffusers pipelines (no downloads: models from configs)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

from _utils import assert_close, tiny_unet
from ddim_fast import FusedSampler, FusedScheduler, NoiseSchedule, layout, reference

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"  # diffusers' own
)


def tiny_cond_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    ).eval()


def images(pipe, seed, **kw):
    with torch.no_grad():
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images


def pipeline_draws(seed, shape, steps):
    """x_T and then one normal per step, in the order a pipeline's generator hands them out."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g)
    return x_T, torch.stack([torch.randn(shape, generator=g) for _ in range(steps)])


def loop(sched, unet, x, **step_kw):
    """What DDPMPipeline/DDIMPipeline do between set_timesteps and post-processing."""
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, **step_kw).prev_sample
    return x


def sensitivity(sched, unet, seed, shape, steps, **step_kw):
    """How far diffusers' own loop moves when x_T moves by 1e-6 relative: a random UNet with clipping
    is chaotic (~4e-4 in the images), so agreement is asked up to that intrinsic sensitivity."""
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    sched.set_timesteps(steps)
    a = loop(sched, unet, x_T.clone(), **step_kw)
    sched.set_timesteps(steps)
    b = loop(sched, unet, x_T * (1 + 1e-6), **step_kw)
    return ((a - b) / 2).abs().max().item()  # images are x / 2 + 0.5


def test_importing_ddim_fast_does_not_import_diffusers():
    code = (
        "import sys, ddim_fast, ddim_fast.scheduler\n"
        "assert 'diffusers' not in sys.modules\n"
        "from ddim_fast import FusedScheduler\n"
        "assert 'diffusers' in sys.modules and FusedScheduler.__module__ == 'ddim_fast.scheduler'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_is_a_diffusers_scheduler():
    from diffusers import ConfigMixin, SchedulerMixin

    sched = FusedScheduler.from_config(DDIMScheduler().config)
    assert isinstance(sched, FusedScheduler) and isinstance(sched, SchedulerMixin) and isinstance(sched, ConfigMixin)
    for source in (DDPMScheduler(), dict(DDPMScheduler().config), {"_class_name": "DDPMScheduler", "num_train_timesteps": 500}):
        assert FusedScheduler.from_config(source).config.source_scheduler == "DDPMScheduler"
    again = FusedScheduler.from_config(sched.config).config  # ours, again (minus diffusers' bookkeeping)
    assert {k: v for k, v in again.items() if k[0] != "_"} == {k: v for k, v in sched.config.items() if k[0] != "_"}
    assert sched.order == 1 and sched.init_noise_sigma == 1.0 and len(sched) == 1000
    x = torch.randn(2, 3, 4, 4)
    assert sched.scale_model_input(x, 10) is x


# ---------------------------------------------------------------------------------------------
# the pipelines: same images as with diffusers' own scheduler
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize(
    "sched_kw",
    [dict(), dict(steps_offset=1), dict(timestep_spacing="trailing"), dict(prediction_type="v_prediction"),
     dict(clip_sample=True)],
    ids=["leading", "offset1", "trailing", "v", "clip"],
)
def test_ddim_pipeline_eta0_same_images(sched_kw, backend):
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(**{"clip_sample": False, **sched_kw}))
    pipe.set_progress_bar_config(disable=True)
    theirs = images(pipe, 3, num_inference_steps=20, eta=0.0)
    tol = max(2e-5, 4 * sensitivity(pipe.scheduler, pipe.unet, 3, (2, 3, 8, 8), 20, eta=0.0))
    pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config, backend=backend)
    ours = images(pipe, 3, num_inference_steps=20, eta=0.0)
    assert pipe.scheduler.resolved_backend == backend
    assert 0.05 < theirs.std() and ours.shape == theirs.shape == (2, 8, 8, 3)
    assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), atol=tol, what=str(sched_kw))


@pytest.mark.parametrize("sched_kw", [dict(), dict(clip_sample=True, timestep_spacing="trailing")], ids=["plain", "clip"])
def test_ddim_pipeline_eta1_same_noise(sched_kw):
    """eta = 1 with the generator's draws passed as explicit noise: the same images as DDIMScheduler."""
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(**{"clip_sample": False, **sched_kw}))
    pipe.set_progress_bar_config(disable=True)
    S = 10
    theirs = images(pipe, 5, num_inference_steps=S, eta=1.0)
    pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config)
    _, noise = pipeline_draws(5, (2, 3, 8, 8), S)
    pipe.scheduler.set_noise(noise)
    ours = images(pipe, 5, num_inference_steps=S, eta=1.0)
    assert pipe.scheduler.resolved_backend == "cpp"
    assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), atol=1e-4, what="DDIM eta=1")
    assert not np.allclose(images(pipe, 5, num_inference_steps=S, eta=1.0), theirs, atol=1e-2)  # Philox: other values


@pytest.mark.parametrize(
    "sched_kw",
    [dict(), dict(variance_type="fixed_large", clip_sample=False), dict(prediction_type="v_prediction", steps_offset=1)],
    ids=["fixed_small-clip", "fixed_large", "v-offset1"],
)
def test_ddpm_pipeline_same_noise_same_images(sched_kw):
    """DDPMPipeline's ancestral loop (eta = 1; sigma-hat for fixed_large; DDPM clipping re-derives eps)."""
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(**sched_kw))
    pipe.set_progress_bar_config(disable=True)
    S = 20
    theirs = images(pipe, 7, num_inference_steps=S)
    pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config)
    _, draws = pipeline_draws(7, (2, 3, 8, 8), S - 1)  # DDPMScheduler draws for every t > 0
    pipe.scheduler.set_noise(torch.cat([draws, torch.zeros(1, 2, 3, 8, 8)]))
    ours = images(pipe, 7, num_inference_steps=S)
    assert 0.05 < theirs.std()
    assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), atol=1e-4, what=str(sched_kw))


def test_philox_noise_follows_the_generator():
    """The documented mapping: seed = one torch.randint(2**63 - 1) draw from the step's generator, then
    the reference Philox stream at (seed, sample, step); same generator seed, same images on any backend."""
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config)
    a, b, c = images(pipe, 1, num_inference_steps=10), images(pipe, 1, num_inference_steps=10), images(pipe, 2, num_inference_steps=10)
    assert np.array_equal(a, b) and not np.allclose(a, c, atol=1e-2)
    assert pipe.scheduler.resolved_backend == "cpp"
    for backend in ("torch", "triton"):  # triton: interpreted on CPU tensors (conftest)
        pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config, backend=backend)
        other = images(pipe, 1, num_inference_steps=10)
        assert pipe.scheduler.resolved_backend == backend
        assert_close(torch.from_numpy(other), torch.from_numpy(a), atol=1e-5, what=f"{backend} vs cpp")

    sched = FusedScheduler.from_config(DDPMScheduler(clip_sample=False).config)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(11)
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ours = sched.step(m, sched.timesteps[0], x, generator=g).prev_sample
    seed = int(torch.randint(2**63 - 1, (1,), generator=torch.Generator().manual_seed(11)))
    table = sched._active[1].table
    expected = torch.empty(x.shape, dtype=torch.float64)
    reference.fused_step(x, m, table, 0, torch.tensor([seed, 0]), 0, 0.0, 0, None, None, None, expected, None, None,
                         compute_dtype=torch.float64)
    assert float(table[0, layout.SIGMA]) > 0.1
    assert_close(ours, expected, atol=1e-5, what="Philox noise of the drawn seed")


@pytest.mark.parametrize(
    "cls, sched_kw, S",
    [
        (DPMSolverMultistepScheduler, dict(solver_order=2), 10),
        (DPMSolverMultistepScheduler, dict(solver_order=3, timestep_spacing="trailing"), 12),
        (DPMSolverMultistepScheduler, dict(solver_order=2, timestep_spacing="leading", prediction_type="v_prediction"), 25),
        (UniPCMultistepScheduler, dict(solver_order=2), 10),
        (UniPCMultistepScheduler, dict(solver_order=3, timestep_spacing="trailing"), 12),
        (UniPCMultistepScheduler, dict(solver_order=2, timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"), 8),
    ],
    ids=["dpm2m", "dpm3m-trailing", "dpm2m-leading-v", "unipc2", "unipc3-trailing", "unipc2-leading-v"],
)
def test_multistep_configs_same_results(cls, sched_kw, S):
    """DPMSolverMultistep and UniPC configs: same timesteps, same samples as diffusers' loop (deterministic)."""
    unet = tiny_unet()
    theirs_sched = cls(num_train_timesteps=1000, **sched_kw)
    ours_sched = FusedScheduler.from_config(theirs_sched.config)
    x_T = torch.randn(2, 3, 8, 8)
    theirs_sched.set_timesteps(S)
    ours_sched.set_timesteps(S)
    assert torch.equal(ours_sched.timesteps, theirs_sched.timesteps)
    theirs, ours = loop(theirs_sched, unet, x_T.clone()), loop(ours_sched, unet, x_T.clone())
    assert ours_sched.resolved_backend == "cpp"
    assert_close(ours, theirs, atol=2e-5 * max(1.0, theirs.abs().max().item()), what=f"{cls.__name__} {sched_kw}")


def test_dpm_solver_config_in_a_ddpm_pipeline():
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    theirs = images(pipe, 0, num_inference_steps=10)
    pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config)
    ours = images(pipe, 0, num_inference_steps=10)
    assert pipe.scheduler.config.source_scheduler == "DPMSolverMultistepScheduler" and 0.05 < theirs.std()
    assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), atol=2e-5, what="DDPMPipeline + DPM-Solver++(2M)")


# ---------------------------------------------------------------------------------------------
# latent, text-conditioned loops with classifier-free guidance
# ---------------------------------------------------------------------------------------------
def cfg_loop(sched, unet, latents, cond, uncond, guidance=7.5, **step_kw):
    """Stable Diffusion's denoising loop (pipeline_stable_diffusion.py), minus the VAE."""
    embeds = torch.cat([uncond, cond])
    outs = []
    with torch.no_grad():
        for t in sched.timesteps:
            latent_in = sched.scale_model_input(torch.cat([latents] * 2), t)
            noise_uncond, noise_text = unet(latent_in, t, encoder_hidden_states=embeds).sample.chunk(2)
            out = sched.step(noise_uncond + guidance * (noise_text - noise_uncond), t, latents, **step_kw)
            latents = out.prev_sample
            outs.append(out)
    return latents, outs


SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DDIMScheduler(**SD_SCHEDULE, steps_offset=1, clip_sample=False, set_alpha_to_one=True),
        lambda: DPMSolverMultistepScheduler(**SD_SCHEDULE, steps_offset=1),
        lambda: UniPCMultistepScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="trailing"),
    ],
    ids=["ddim", "dpm2m", "unipc"],
)
def test_latent_text_conditioned_guidance_loop(make):
    unet = tiny_cond_unet()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    theirs_sched = make()
    theirs_sched.set_timesteps(8)
    theirs, _ = cfg_loop(theirs_sched, unet, latents.clone(), cond, uncond)
    ours_sched = FusedScheduler.from_config(theirs_sched.config)
    ours_sched.set_timesteps(8)
    ours, _ = cfg_loop(ours_sched, unet, latents.clone(), cond, uncond)
    assert torch.equal(ours_sched.timesteps, theirs_sched.timesteps)
    assert_close(ours, theirs, atol=2e-5 * max(1.0, theirs.abs().max().item()), what=type(theirs_sched).__name__)


def test_set_alpha_to_one_false_lands_on_the_x0_prediction():
    """The one deliberate difference: with set_alpha_to_one=False diffusers' last step lands on
    alpha[0], ours on alpha = 1 (the paper's alpha_0 := 1): our output is its last x0-prediction."""
    unet = tiny_cond_unet()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    theirs_sched = DDIMScheduler(**SD_SCHEDULE, steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    theirs_sched.set_timesteps(6)
    theirs, their_outs = cfg_loop(theirs_sched, unet, latents.clone(), cond, uncond)
    ours_sched = FusedScheduler.from_config(theirs_sched.config)
    ours_sched.set_timesteps(6)
    ours, our_outs = cfg_loop(ours_sched, unet, latents.clone(), cond, uncond)
    scale = max(1.0, theirs.abs().max().item())
    assert_close(ours, their_outs[-1].pred_original_sample, atol=2e-5 * scale, what="ours vs their last x0")
    assert_close(our_outs[-2].prev_sample, their_outs[-2].prev_sample, atol=2e-5 * scale, what="the steps before")
    assert (ours - theirs).abs().max() > 1e-3  # it is a real difference of one step


def test_stable_diffusion_pipeline_with_prompt_embeds():
    """A small StableDiffusionPipeline from random components (no tokenizer/text encoder: prompt_embeds)."""
    pytest.importorskip("transformers", reason="StableDiffusionPipeline imports transformers")
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=16).eval()
    scheduler = DDIMScheduler(**SD_SCHEDULE, steps_offset=1, clip_sample=False, set_alpha_to_one=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=tiny_cond_unet(), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(2, 7, 32, generator=g), negative_prompt_embeds=torch.randn(2, 7, 32, generator=g),
              height=16, width=16, num_inference_steps=6, guidance_scale=7.5, output_type="np")
    with torch.no_grad():
        theirs = pipe(generator=torch.Generator().manual_seed(1), **kw).images
        pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config)
        ours = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    assert pipe.scheduler.resolved_backend == "cpp" and ours.shape == theirs.shape == (2, 16, 16, 3)
    assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), atol=1e-4, what="StableDiffusionPipeline")


# ---------------------------------------------------------------------------------------------
# the rest of the scheduler interface
# ---------------------------------------------------------------------------------------------
class TimeOnlyModel(torch.nn.Module):
    """eps that depends on t alone (values representable in fp16), so the model output is identical
    whatever the sample's dtype."""

    def forward(self, x, t):
        g = torch.Generator().manual_seed(int(t))
        return (0.5 * torch.randn(x.shape, generator=g)).to(torch.float16).to(x.dtype)


def test_fp16_sample_keeps_a_float32_state():
    model = TimeOnlyModel()
    x_T = torch.randn(2, 3, 8, 8).to(torch.float16).to(torch.float32)  # the same start in both dtypes
    sched = FusedScheduler.from_config(DDIMScheduler(clip_sample=False).config)
    results = {}
    for dtype in (torch.float32, torch.float16):
        sched.set_timesteps(20)
        x = x_T.to(dtype)
        for t in sched.timesteps:
            out = sched.step(model(x, t), t, x)
            x = out.prev_sample
            assert x.dtype == out.pred_original_sample.dtype == dtype
        results[dtype] = x
    assert torch.equal(results[torch.float16], results[torch.float32].to(torch.float16))
    # the discriminating power: diffusers' scheduler with fp16 state rounds at every step
    theirs = DDIMScheduler(clip_sample=False)
    theirs.set_timesteps(20)
    x = x_T.to(torch.float16)
    for t in theirs.timesteps:
        x = theirs.step(model(x, t), t, x).prev_sample.to(torch.float16)
    assert not torch.equal(x, results[torch.float32].to(torch.float16))


@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_img2img_begin_index_and_add_noise(cls):
    """img2img: add_noise at the start timestep, then the tail of the schedule (a multistep solver warms up again)."""
    unet = tiny_unet()
    theirs = cls(num_train_timesteps=1000, **({"clip_sample": False} if cls is DDIMScheduler else {}))
    ours = FusedScheduler.from_config(theirs.config)
    x0, noise = torch.randn(2, 3, 8, 8).clamp(-1, 1), torch.randn(2, 3, 8, 8)
    results = []
    for sched in (theirs, ours):
        sched.set_timesteps(20)
        t_start = 8
        if hasattr(sched, "set_begin_index"):  # as img2img pipelines do (DDIMScheduler has none)
            sched.set_begin_index(t_start)
        x = sched.add_noise(x0, noise, sched.timesteps[t_start : t_start + 1].repeat(2))
        with torch.no_grad():
            for t in sched.timesteps[t_start:]:
                x = sched.step(unet(x, t).sample, t, x).prev_sample
        results.append(x)
    assert_close(results[1], results[0], atol=2e-5 * max(1.0, results[0].abs().max().item()), what=cls.__name__)
    # any training timestep, as DDIMScheduler (DPM-Solver's add_noise knows only its own timesteps)
    t, x0_3, noise_3 = torch.tensor([0, 500, 999]), x0[:1].expand(3, -1, -1, -1), noise[:1].expand(3, -1, -1, -1)
    assert_close(ours.add_noise(x0_3, noise_3, t), DDIMScheduler().add_noise(x0_3, noise_3, t), atol=1e-5)
    assert_close(ours.get_velocity(x0_3, noise_3, t), DDIMScheduler().get_velocity(x0_3, noise_3, t), atol=1e-5)
    assert ours.add_noise(x0_3.half(), noise_3.half(), t).dtype == torch.float16


def test_first_step_found_from_the_timestep_without_set_begin_index():
    unet = tiny_unet()
    theirs, ours = DDIMScheduler(clip_sample=False), FusedScheduler.from_config(DDIMScheduler(clip_sample=False).config)
    for s in (theirs, ours):
        s.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = [theirs.step(unet(x, t).sample, t, x).prev_sample for t in theirs.timesteps[4:5]][0]
        b = [ours.step(unet(x, t).sample, t, x).prev_sample for t in ours.timesteps[4:5]][0]
    assert ours.step_index == 5
    assert_close(b, a, atol=2e-5)


def test_save_pretrained_round_trip(tmp_path):
    src = UniPCMultistepScheduler(**SD_SCHEDULE, steps_offset=1)
    sched = FusedScheduler.from_config(src.config, solver="dpmpp_3m", skip="logsnr")
    sched.save_pretrained(tmp_path / "s")
    back = FusedScheduler.from_pretrained(tmp_path / "s")
    assert isinstance(back, FusedScheduler)
    strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731 (diffusers' bookkeeping)
    assert strip(back.config) == strip(sched.config)
    for s in (sched, back):
        s.set_timesteps(12)
    assert torch.equal(back.timesteps, sched.timesteps) and back._plan == sched._plan
    # a whole pipeline saved with our scheduler loads it back (model_index.json names ddim_fast.scheduler)
    DDPMPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(tmp_path / "p")
    for kw in ({}, {"scheduler": FusedScheduler.from_pretrained(tmp_path / "p", subfolder="scheduler")}):
        loaded = DDPMPipeline.from_pretrained(tmp_path / "p", **kw)
        assert isinstance(loaded.scheduler, FusedScheduler) and strip(loaded.scheduler.config) == strip(sched.config)


@pytest.mark.parametrize("solver, skip", [("ipndm", "logsnr"), ("unipc", "logsnr"), ("dpmpp_2m_sde", "karras"),
                                          ("ddim", [5, 100, 300, 600, 999])])
def test_any_solver_and_skip_equals_fused_sampler(solver, skip):
    """solver=/skip= reach the scheduler unchanged: the same trajectory as FusedSampler with that solver."""
    unet = tiny_unet()
    cfg = DDIMScheduler(clip_sample=False).config
    eta = 1.0 if solver == "dpmpp_2m_sde" else 0.0
    sched = FusedScheduler.from_config(cfg, solver=solver, skip=skip, eta=eta)
    S = 5 if not isinstance(skip, str) else 8
    sched.set_timesteps(S)
    x_T = torch.randn(2, 3, 8, 8)
    noise = torch.randn(S, 2, 3, 8, 8)
    sched.set_noise(noise)
    ours = loop(sched, unet, x_T.clone())
    sampler = FusedSampler.from_diffusers(unet, cfg, steps=S, solver=solver, skip=skip, eta=eta, precision="fp32")
    assert torch.equal(sampler.timesteps, sched.timesteps)
    expected = sampler.sample(x_T, noise=noise)
    assert_close(ours, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), what=f"{solver} {skip}")


def test_schedule_only_configs_sample_with_our_solver():
    """Stable Diffusion's default PNDM (and Euler) configs: their schedule and spacing, our DDIM."""
    for src in (PNDMScheduler(**SD_SCHEDULE, steps_offset=1, skip_prk_steps=True), EulerDiscreteScheduler(**SD_SCHEDULE)):
        sched = FusedScheduler.from_config(src.config)
        assert sched.config.source_scheduler == type(src).__name__
        sched.set_timesteps(10)
        ddim = DDIMScheduler.from_config(src.config, clip_sample=False, set_alpha_to_one=True)
        ddim.set_timesteps(10)
        if isinstance(src, PNDMScheduler):
            assert torch.equal(sched.timesteps, ddim.timesteps)
        assert torch.allclose(sched.alphas_cumprod, ddim.alphas_cumprod)


def test_tuned_timesteps_file(tmp_path):
    from ddim_fast import tune

    schedule = NoiseSchedule.from_diffusers(DDIMScheduler(clip_sample=False).config)
    path = tmp_path / "steps.json"
    tune.save_tuned(path, [3, 80, 250, 600, 999], model=tiny_unet(), schedule=schedule, solver="ipndm", steps=5, info={})
    sched = FusedScheduler.from_config(DDIMScheduler(clip_sample=False).config, solver="ipndm", skip=str(path))
    assert sched.config.skip == [3, 80, 250, 600, 999]  # stored as timesteps: save_pretrained keeps them
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == [999, 600, 250, 80, 3]
    with pytest.raises(ValueError, match="solver 'ipndm' in the file, 'ddim' given"):
        FusedScheduler.from_config(DDIMScheduler(clip_sample=False).config, skip=str(path))
    with pytest.raises(ValueError, match="tuned for another setup: schedule"):
        FusedScheduler.from_config(DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear").config, solver="ipndm", skip=str(path))
    with pytest.raises(ValueError, match="clip_sample: the solver 'ipndm' integrates eps"):
        FusedScheduler.from_config(DDIMScheduler(clip_sample=True).config, solver="ipndm").set_timesteps(5)


def test_tuned_file_with_model_timesteps_runs_the_pipeline_unet_at_them(tmp_path):
    """A file tuned with shift_last: ``timesteps`` (what a pipeline calls its UNet with) carries the
    shifted last timestep, the coefficients stay the solver's, save_pretrained keeps both, and the
    loop equals FusedSampler(model_timesteps=...)."""
    from ddim_fast import tune

    cfg = DDIMScheduler(clip_sample=False).config
    schedule = NoiseSchedule.from_diffusers(cfg)
    unet = tiny_unet()
    path = tmp_path / "steps.json"
    tau, told = [3, 80, 250, 600, 999], [9, 80, 250, 600, 999]
    tune.save_tuned(path, tau, model=unet, schedule=schedule, solver="unipc", steps=5, info={}, model_timesteps=told)
    sched = FusedScheduler.from_config(cfg, solver="unipc", skip=str(path))
    assert sched.config.skip == tau and sched.config.model_timesteps == told
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == told[::-1]
    seen = []

    def model(x, t):
        seen.append(int(t))
        return unet(x, t)

    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = loop(sched, model, x_T.clone())
    assert seen == told[::-1]
    sampler = FusedSampler.from_diffusers(unet, cfg, steps=5, solver="unipc", skip=tau, model_timesteps=told, precision="fp32")
    expected = sampler.sample(x_T)
    assert_close(ours, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), what="shifted last call")
    unshifted = FusedSampler.from_diffusers(unet, cfg, steps=5, solver="unipc", skip=tau, precision="fp32").sample(x_T)
    assert not torch.equal(ours, unshifted)  # the tiny UNet's time embedding moves it only a little
    again = FusedScheduler.from_config(sched.config)  # what save_pretrained / from_pretrained round-trip
    again.set_timesteps(5)
    assert again.timesteps.tolist() == told[::-1]
    # explicit timesteps= replace the configured ones, and with them the pairing
    again.set_timesteps(timesteps=[999, 600, 250, 80, 3])
    assert again.timesteps.tolist() == [999, 600, 250, 80, 3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(skip=[3, 80, 250], model_timesteps=[9, 80]), r"model_timesteps: expected a sequence of 3 integer timesteps in \[0, 1000\)"),
    (dict(skip=[3, 80, 250], model_timesteps=[80, 80, 250]), "model_timesteps: expected distinct timesteps"),
    (dict(skip="logsnr", model_timesteps=[9, 80, 250]), "model_timesteps: they pair with explicit timesteps"),
])  # fmt: skip
def test_bad_model_timesteps_in_the_scheduler(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedScheduler(**kwargs)


def test_step_compiles_fullgraph_and_equals_eager():
    """A whole denoising loop (model + scheduler step) under torch.compile(fullgraph=True): no graph
    break (no .item(), no nonzero) and the same result as eager, with a ring, a saved state and noise."""
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def model(x, t):
        return torch.tanh(conv(x)) * (1 + t.to(torch.float32) / 1000)

    for solver, eta in (("unipc", 0.0), ("ddim", 1.0)):
        sched = FusedScheduler.from_config(DDIMScheduler(clip_sample=False).config, solver=solver, eta=eta)

        def run(x):
            for t in sched.timesteps:
                x = sched.step(model(x, t), t, x).prev_sample
            return x

        x_T = torch.randn(2, 3, 8, 8)
        results = []
        for fn in (run, torch.compile(run, fullgraph=True, backend="aot_eager")):
            sched.set_timesteps(6, generator=torch.Generator().manual_seed(4))
            with torch.no_grad():
                results.append(fn(x_T.clone()))
        assert sched.resolved_backend == "cpp"
        assert_close(results[1], results[0], atol=1e-6, what=solver)


# ---------------------------------------------------------------------------------------------
# bad input: clear errors
# ---------------------------------------------------------------------------------------------
def test_step_errors():
    sched = FusedScheduler.from_config(DDIMScheduler().config)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="timestep: 123 is not in the schedule"):
        sched.step(x, 123, x)
    with pytest.raises(ValueError, match="timestep: 124 is not in the schedule"):
        sched.step(x, torch.tensor(124), x)
    ts = sched.timesteps
    sched.step(x, ts[0], x)
    with pytest.raises(ValueError, match="expected 600 at step 1"):
        sched.step(x, ts[2], x)
    with pytest.raises(ValueError, match="sample: expected shape"):
        sched.step(x[:, :2], ts[1], x[:, :2])
    with pytest.raises(ValueError, match="eta"):
        sched.step(x, ts[1], x, eta=0.5)
    for t in ts[1:]:
        sched.step(x, t, x)
    with pytest.raises(ValueError, match="all 5 steps"):
        sched.step(x, ts[-1], x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="timesteps: expected strictly decreasing"):
        sched.set_timesteps(timesteps=[10, 500])
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="model_out"):
        sched.step(torch.randn(1, 6, 4, 4), ts[0], x)


@pytest.mark.parametrize(
    "src, kw, match",
    [
        (EulerDiscreteScheduler, dict(use_karras_sigmas=True), "use_karras_sigmas"),
        (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        (UniPCMultistepScheduler, dict(solver_type="bh1"), "solver_type='bh1'"),
        (UniPCMultistepScheduler, dict(disable_corrector=[0]), "disable_corrector"),
        (UniPCMultistepScheduler, dict(solver_order=1), "solver_order=1"),
        (DDPMScheduler, dict(variance_type="learned_range"), "variance_type='learned_range'"),
        (DDIMScheduler, dict(thresholding=True), "thresholding"),
        (DDIMScheduler, dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
        (DDIMScheduler, dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
    ],
)
def test_unsupported_configs_rejected_by_name(src, kw, match):
    with pytest.raises(ValueError, match=match):
        FusedScheduler.from_config({**src().config, **kw})  # a live config (no _class_name): its keys name the class


def test_unsupported_classes_and_options_rejected():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler is not supported"):
        FusedScheduler.from_config(FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="config: the fields .*'shift'.* are not DDIMScheduler's"):
        FusedScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)  # a bare config: recognised by its keys
    with pytest.raises(ValueError, match="solver: expected one of"):
        FusedScheduler.from_config(DDIMScheduler().config, solver="heun")
    with pytest.raises(ValueError, match="skip: expected one of"):
        FusedScheduler.from_config(DDIMScheduler().config, skip="cosine")
    with pytest.raises(ValueError, match="eta"):
        FusedScheduler.from_config(DDIMScheduler().config, eta=-1.0)
    with pytest.raises(ValueError, match="eta: the solver 'dpmpp_2m' is deterministic"):
        FusedScheduler.from_config(DPMSolverMultistepScheduler().config, eta=1.0).set_timesteps(10)
    with pytest.raises(ValueError, match="num_inference_steps: the configured timesteps"):
        FusedScheduler.from_config(DDIMScheduler().config, skip=[1, 500, 999]).set_timesteps(10)


def test_config_edited_in_place_is_followed():
    """StableDiffusionPipeline rewrites an outdated steps_offset in the scheduler's config in place."""
    from diffusers.configuration_utils import FrozenDict

    sched = FusedScheduler.from_config(DDIMScheduler(steps_offset=0).config)
    sched._internal_dict = FrozenDict({**sched.config, "steps_offset": 1})  # what the pipeline does
    sched.set_timesteps(10)
    assert sched.timesteps[-1].item() == 1


def test_custom_timesteps_and_nonfinite_steps():
    unet = tiny_unet()
    cfg = DDIMScheduler(clip_sample=False).config
    custom, named = FusedScheduler.from_config(cfg), FusedScheduler.from_config(cfg, skip=[10, 500, 999])
    custom.set_timesteps(timesteps=[999, 500, 10])
    named.set_timesteps(3)
    assert custom.timesteps.tolist() == named.timesteps.tolist() == [999, 500, 10] and custom.num_inference_steps == 3
    x_T = torch.randn(2, 3, 8, 8)
    assert torch.equal(loop(custom, unet, x_T.clone()), loop(named, unet, x_T.clone()))
    assert custom.nonfinite_steps() == []
    custom.set_timesteps(timesteps=[999, 500, 10])
    x = x_T.clone()
    for k, t in enumerate(custom.timesteps):
        m = torch.full_like(x, float("nan")) if k == 1 else torch.zeros_like(x)
        x = custom.step(m, t, x).prev_sample
    assert custom.nonfinite_steps() == [1, 2]  # the NaN model output at step 1, and the state it made at step 2
