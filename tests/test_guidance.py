"""Conditional models: model_kwargs pass-through and classifier-free guidance in one batched call."""

import pytest
import torch

from _utils import EagerReplayCapturer, assert_close
from ddim_fast import FusedSampler, NoiseSchedule
from ddim_fast.graphs import GraphCache


class ClassConditional(torch.nn.Module):
    """eps(x, t, y) = tanh(conv(x)) * (1 + t/T) + emb[y]; label 10 is the 'null' class."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.emb = torch.nn.Embedding(11, 3)
        self.calls = []

    def forward(self, x, t, class_labels):
        self.calls.append(x.shape[0])
        assert class_labels.shape == (x.shape[0],)
        return 0.5 * torch.tanh(self.conv(x)) * (1 + t.float()[:, None, None, None] / 1000) + self.emb(class_labels)[:, :, None, None]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ClassConditional().eval()


def by_hand(model, labels, null, scale):
    """The two-call formula eps_u + s (eps_c - eps_u), as a model for an unguided sampler."""

    def guided(x, t):
        eps_c = model(x, t, class_labels=labels)
        eps_u = model(x, t, class_labels=null)
        return eps_u + scale * (eps_c - eps_u)

    return guided


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.5])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_guidance_equals_two_call_formula(model, scale, eta):
    labels, null = torch.tensor([1, 7, 3]), torch.full((3,), 10)
    schedule = NoiseSchedule.linear(1000)
    expected = FusedSampler(by_hand(model, labels, null, scale), schedule, steps=10, eta=eta, precision="fp32").sample(
        shape=(3, 3, 8, 8), seed=4
    )
    model.calls.clear()
    ours = FusedSampler(
        model, schedule, steps=10, eta=eta, precision="fp32", guidance_scale=scale,
        model_kwargs={"class_labels": labels}, uncond_kwargs={"class_labels": null},
    ).sample(shape=(3, 3, 8, 8), seed=4)
    assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert model.calls == [6] * 10  # one batched call of 2B per step


def test_model_kwargs_pass_through_and_per_call_override(model):
    s = FusedSampler(model, steps=5, precision="fp32", model_kwargs={"class_labels": torch.tensor([2, 2])})
    a = s.sample(shape=(2, 3, 8, 8), seed=0)
    b = s.sample(shape=(2, 3, 8, 8), seed=0, model_kwargs={"class_labels": torch.tensor([5, 5])})
    c = FusedSampler(model, steps=5, precision="fp32", model_kwargs={"class_labels": torch.tensor([5, 5])}).sample(
        shape=(2, 3, 8, 8), seed=0
    )
    assert not torch.allclose(a, b) and torch.equal(b, c)


def test_guidance_in_graph_path_with_new_labels_on_replay(model):
    kw = dict(steps=6, precision="fp32", guidance_scale=2.0, uncond_kwargs={"class_labels": torch.full((2,), 10)})
    eager = FusedSampler(model, cuda_graph=False, **kw)
    g = FusedSampler(model, **kw)
    g._graphs = GraphCache(EagerReplayCapturer())
    for labels in ([1, 2], [8, 9]):
        y = {"class_labels": torch.tensor(labels)}
        assert torch.equal(g.sample(shape=(2, 3, 8, 8), seed=1, model_kwargs=y), eager.sample(shape=(2, 3, 8, 8), seed=1, model_kwargs=y))
    assert len(g._graphs) == 1


@pytest.mark.parametrize(
    "cond, uncond, match",
    [
        ({"class_labels": torch.tensor([1, 2])}, {}, "same keys"),
        ({"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([10])}, r"uncond_kwargs\['class_labels'\]"),
        ({"class_labels": torch.tensor([1, 2, 3])}, {"class_labels": torch.tensor([10, 10, 10])}, "batch size 2"),
    ],
)
def test_guidance_argument_errors(model, cond, uncond, match):
    s = FusedSampler(model, steps=3, guidance_scale=2.0, model_kwargs=cond, uncond_kwargs=uncond)
    with pytest.raises(ValueError, match=match):
        s.sample(shape=(2, 3, 8, 8), seed=0)


def test_guidance_scale_validated(model):
    with pytest.raises(ValueError, match="guidance_scale"):
        FusedSampler(model, guidance_scale=float("inf"))
    with pytest.raises(TypeError, match="model_kwargs"):
        FusedSampler(model, model_kwargs=[1, 2])
