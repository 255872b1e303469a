"""Sample-quality and reconstruction measures for the paper's experiments (Table 1, Table 2, Fig. 4).

Frechet distance (FID's formula, Heusel et al. 2017) in a feature space
----------------------------------------------------------------------
    FD = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

with (mu, S) the mean and covariance of features of two image sets. FID takes the features
from Inception-v3's pool layer; no Inception weights can be downloaded here, so the default
feature space is the 64-wide penultimate layer of a small CNN trained on scikit-learn's
handwritten digits (``DigitClassifier``, shipped as ``assets/digit_classifier.safetensors``
+ ``.json``; trained on a fixed 80 % split, its accuracy on the held-out 20 % is recorded in
the JSON and checked by the tests). Anyone with Inception weights of their own passes a
callable ``images -> (N, D) features`` as ``extractor`` and gets real FID from the same code.
The numbers are "FID-like": comparable with each other (same features, same sample count),
not with the paper's CIFAR-10 FIDs.

The matrix square root: tr((S_1 S_2)^(1/2)) = tr((S_1^(1/2) S_2 S_1^(1/2))^(1/2)), and the
inner matrix is symmetric positive semi-definite, so the trace is the sum of the square roots
of its eigenvalues: two ``eigh`` calls in float64, no scipy at run time (scipy's ``sqrtm`` is
the oracle in the tests). Tiny negative eigenvalues from rounding are clipped to 0, so a
singular covariance (fewer samples than features) needs no epsilon on the diagonal.

The estimate is biased upwards by roughly O(D / N) for N samples; compare only numbers
computed with the same N (``ddim-fast eval table1`` uses one N per table and reports the
spread between two seeds).

Images everywhere in this module are float tensors (N, C, H, W) in [-1, 1], the sampler's
convention (uint8 (N, H, W, C) arrays, the ``.npz`` layout, are accepted too and converted).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "DigitClassifier",
    "CLASSIFIER_PATH",
    "load_digit_classifier",
    "train_digit_classifier",
    "digits_split",
    "as_images",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_images",
    "trace_sqrt_product",
    "reference_statistics",
    "label_distribution",
    "classifier_accuracy",
    "reconstruction_mse",
    "seconds_per_sample",
]

CLASSIFIER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digit_classifier.json")
CLASSIFIER_FORMAT = "ddim_fast.digit_classifier"
FEATURE_DIM = 64
NUM_CLASSES = 10

Images = Union[torch.Tensor, np.ndarray]
Extractor = Callable[[torch.Tensor], Any]


# --------------------------------------------------------------------------------------------
# the digit classifier (the default feature space)
# --------------------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """A 38k-parameter CNN for 16x16 grey digits in [-1, 1]: conv-pool, conv-pool, 64 features, 10 logits.

    ``features(x)`` is the 64-wide penultimate layer before its ReLU (the Frechet distance's
    feature space: the pre-activation keeps it closer to Gaussian and has no dead dimensions);
    ``forward(x)`` the logits. Inputs of another size are resized to 16x16 (bilinear,
    antialiased) and RGB is averaged to grey, so 8x8 originals or 32x32 samples work too.
    """

    resolution = 16

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, NUM_CLASSES)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=torch.float32, device=self.fc1.weight.device)
        if x.ndim != 4:
            raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] != 1:
            raise ValueError(f"images: expected 1 or 3 channels, got {x.shape[1]}")
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            x = nn.functional.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)  # 16 -> 8
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)  # 8 -> 4
        return self.fc1(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.features(x)))


def digits_split(n: int = 1797, test_fraction: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of scikit-learn's digits: a fixed seeded permutation, sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _digits() -> Tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits as the diffusion model sees them (16x16, [-1, 1]) and their labels."""
    from sklearn.datasets import load_digits as _sk_digits

    from ddim_fast.data import load_digits

    x, _ = load_digits(image_size=16)
    return x, _sk_digits().target.astype(np.int64)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size]).float().cpu() for i in range(0, x.shape[0], batch_size)])


def train_digit_classifier(
    out: Optional[str] = CLASSIFIER_PATH, *, seed: int = 0, epochs: int = 40, batch: int = 64, lr: float = 2e-3,
    feature_dim: int = FEATURE_DIM,
) -> Tuple[DigitClassifier, Dict[str, Any]]:
    """Train the classifier on the train split (with +-1 pixel shifts and light noise), evaluate it
    on the held-out split, and (``out``) write ``<out>.json`` + ``.safetensors`` with the
    reference feature statistics of all 1,797 digits (the diffusion model's training data).

    About 20 s on one CPU core. ``python -m ddim_fast.metrics`` regenerates the shipped asset.
    """
    from safetensors.torch import save

    from ddim_fast.data import atomic_write_bytes

    x, y = _digits()
    train_idx, test_idx = digits_split(len(x), seed=seed)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xtr, ytr = x[torch.as_tensor(train_idx)], torch.as_tensor(y[train_idx])
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            xb = nn.functional.pad(xtr[idx], (1, 1, 1, 1), value=-1.0)
            dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()  # one shift per batch: +-1 px
            xb = xb[:, :, dy : dy + 16, dx : dx + 16]
            xb = xb + 0.1 * torch.rand((), generator=g) * torch.randn(xb.shape, generator=g)
            loss = nn.functional.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    test_acc = classifier_accuracy(x[torch.as_tensor(test_idx)], y[test_idx], model)
    train_acc = classifier_accuracy(xtr, y[train_idx], model)
    mu, sigma = feature_statistics(x, model.features)
    info = {
        "format": CLASSIFIER_FORMAT,
        "version": 1,
        "architecture": "conv3x3(1->16)-relu-maxpool2, conv3x3(16->32)-relu-maxpool2, fc(512->64) [features], relu, fc(64->10)",
        "input": "float (N, 1, 16, 16) in [-1, 1]: sklearn digits /16, bilinear 8x8 -> 16x16, *2-1 (ddim_fast.data.load_digits)",
        "feature_dim": feature_dim,
        "split": {"n": int(len(x)), "seed": seed, "test_fraction": 0.2, "rule": "ddim_fast.metrics.digits_split",
                  "test_indices": [int(i) for i in test_idx]},
        "training": {"epochs": epochs, "batch": batch, "lr": lr, "optimizer": "Adam, cosine decay",
                     "augmentation": "+-1 pixel shifts, Gaussian noise of std U(0, 0.1)"},
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "num_test": int(len(test_idx)),
        "reference": {"name": "digits-all", "n": int(len(x)),
                      "what": "feature mean/covariance of all 1,797 digits (16x16), the embedded model's training data"},
    }
    if out is not None:
        tensors = {f"model/{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
        tensors["reference/mu"] = torch.from_numpy(mu)
        tensors["reference/sigma"] = torch.from_numpy(sigma)
        blob = save(tensors)
        base = os.path.splitext(out)[0]
        atomic_write_bytes(base + ".safetensors", blob)
        info.update(weights=os.path.basename(base) + ".safetensors", sha256=_sha256(blob))
        atomic_write_bytes(base + ".json", (json.dumps(info, indent=1) + "\n").encode())
    return model, info


_CLASSIFIER_CACHE: Dict[str, Tuple[DigitClassifier, Dict[str, Any], Dict[str, torch.Tensor]]] = {}


def _load_classifier_files(path: Optional[str]):
    from safetensors.torch import load

    path = os.path.abspath(path or CLASSIFIER_PATH)
    if path in _CLASSIFIER_CACHE:
        return _CLASSIFIER_CACHE[path]
    json_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"digit classifier {json_path!r} is missing (python -m ddim_fast.metrics rebuilds it)")
    with open(json_path, encoding="utf-8") as f:
        info = json.load(f)
    if info.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{json_path!r} is not a {CLASSIFIER_FORMAT} file")
    weights = os.path.join(os.path.dirname(json_path), info["weights"])
    with open(weights, "rb") as f:
        blob = f.read()
    if _sha256(blob) != info["sha256"]:
        raise ValueError(f"digit classifier weights {weights!r} do not match the SHA-256 in {json_path!r}")
    tensors = load(blob)
    model = DigitClassifier(int(info["feature_dim"]))
    model.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
    model.eval().requires_grad_(False)
    _CLASSIFIER_CACHE[path] = (model, info, tensors)
    return _CLASSIFIER_CACHE[path]


def load_digit_classifier(path: Optional[str] = None) -> DigitClassifier:
    """The shipped classifier (eval mode, frozen); ``path`` another ``.json`` written by ``train_digit_classifier``."""
    return _load_classifier_files(path)[0]


def classifier_info(path: Optional[str] = None) -> Dict[str, Any]:
    """The JSON record of the classifier: split, test accuracy, architecture."""
    return dict(_load_classifier_files(path)[1])


# --------------------------------------------------------------------------------------------
# features, statistics, Frechet distance
# --------------------------------------------------------------------------------------------
def as_images(images: Images) -> torch.Tensor:
    """Float (N, C, H, W) in [-1, 1] from a float tensor (passed through) or a uint8 array/tensor (N, H, W[, C])."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images):
        raise TypeError(f"images: expected a tensor or an array, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        x = images
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"images: uint8 images must be (N, H, W) or (N, H, W, C), got {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if not images.is_floating_point() or images.ndim != 4:
        raise ValueError(f"images: expected float (N, C, H, W) in [-1, 1] or uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
    return images


def _default_extractor() -> Extractor:
    return load_digit_classifier().features


def feature_statistics(images: Images, extractor: Optional[Extractor] = None, batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64 of ``extractor(images)``, run in batches.

    ``extractor``: any callable (N, C, H, W) float in [-1, 1] -> (N, D) tensor or array
    (default: the digit classifier's features). For Inception-based FID, wrap your network so
    that it resizes/normalises as it expects and returns its 2048-wide pool features.
    """
    x = as_images(images)
    if x.shape[0] < 2:
        raise ValueError(f"images: need at least 2 images for a covariance, got {x.shape[0]}")
    fn = extractor or _default_extractor()
    feats = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            f = fn(x[i : i + batch_size])
            f = f.detach().cpu().double().numpy() if torch.is_tensor(f) else np.asarray(f, dtype=np.float64)
            feats.append(f.reshape(f.shape[0], -1))
    f = np.concatenate(feats)
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding eigenvalues -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for covariances S1, S2, through the symmetric form S1^(1/2) S2 S1^(1/2)."""
    r = _sqrtm_psd(sigma1)
    m = r @ sigma2 @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID's formula), float64."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes disagree: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    d = mu1 - mu2
    fd = float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(fd, 0.0)


def reference_statistics(extractor: Optional[Extractor] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of all 1,797 digits: shipped with the classifier for the default features,
    computed (needs scikit-learn) for a user ``extractor``."""
    if extractor is None:
        tensors = _load_classifier_files(None)[2]
        return tensors["reference/mu"].numpy(), tensors["reference/sigma"].numpy()
    x, _ = _digits()
    return feature_statistics(x, extractor)


def frechet_distance_images(
    images: Images, reference: Union[Images, Tuple[np.ndarray, np.ndarray], str] = "digits", extractor: Optional[Extractor] = None
) -> float:
    """Frechet distance between ``images`` and ``reference``: another image set, precomputed
    ``(mu, sigma)``, or ``"digits"`` (all scikit-learn digits), in ``extractor``'s feature space."""
    mu1, s1 = feature_statistics(images, extractor)
    if isinstance(reference, str):
        if reference != "digits":
            raise ValueError(f"reference: expected 'digits', images or (mu, sigma), got {reference!r}")
        mu2, s2 = reference_statistics(extractor)
    elif isinstance(reference, tuple) and len(reference) == 2:
        mu2, s2 = reference
    else:
        mu2, s2 = feature_statistics(reference, extractor)
    return frechet_distance(mu1, s1, mu2, s2)


# --------------------------------------------------------------------------------------------
# labels, accuracy, reconstruction, timing
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _predict(images: Images, classifier: Optional[nn.Module]) -> Tuple[np.ndarray, np.ndarray]:
    clf = classifier or load_digit_classifier()
    p = torch.softmax(_batched(clf, as_images(images)), dim=1)
    conf, label = p.max(dim=1)
    return label.numpy(), conf.numpy()


def classifier_accuracy(images: Images, labels, classifier: Optional[nn.Module] = None) -> float:
    """Fraction of ``images`` whose predicted digit equals ``labels``."""
    pred, _ = _predict(images, classifier)
    return float((pred == np.asarray(labels)).mean())


def label_distribution(images: Images, classifier: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Mode coverage of generated digits through the classifier's predicted labels.

    Returns ``counts`` (10), ``coverage`` (classes that get at least half their uniform share,
    0..10), ``tv_uniform`` (total-variation distance of the label histogram to uniform: the
    digits data set is balanced to within 1 %), ``entropy_bits`` (log2(10) = 3.32 when
    balanced) and ``confidence`` (mean max-probability, a rough "looks like a digit" figure).
    """
    pred, conf = _predict(images, classifier)
    counts = np.bincount(pred, minlength=NUM_CLASSES)
    frac = counts / counts.sum()
    nz = frac[frac > 0]
    return {
        "n": int(counts.sum()),
        "counts": [int(c) for c in counts],
        "coverage": int((frac >= 0.5 / NUM_CLASSES).sum()),
        "tv_uniform": float(0.5 * np.abs(frac - 1.0 / NUM_CLASSES).sum()),
        "entropy_bits": float(-(nz * np.log2(nz)).sum()),
        "confidence": float(conf.mean()),
    }


def reconstruction_mse(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> Union[float, torch.Tensor]:
    """Per-dimension mean squared error with images scaled from [-1, 1] to [0, 1] (the paper's Table 2 unit).

    ``reduction``: "mean" (a float over everything) or "none" (one value per image).
    """
    if x.shape != y.shape:
        raise ValueError(f"shapes disagree: {tuple(x.shape)} vs {tuple(y.shape)}")
    err = ((x.double() - y.double()) / 2.0) ** 2  # ((x + 1) / 2 - (y + 1) / 2) ** 2
    if reduction == "none":
        return err.reshape(err.shape[0], -1).mean(dim=1)
    if reduction != "mean":
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    return float(err.mean())


def seconds_per_sample(sampler, shape: Sequence[int], *, seed: int = 0, repeats: int = 1, warmup: bool = True) -> float:
    """Wall-clock seconds per image of ``sampler.sample(shape=shape, seed=seed)`` (best of ``repeats``)."""
    if warmup:
        sampler.sample(shape=(1, *tuple(shape)[1:]), seed=seed)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        sampler.sample(shape=tuple(shape), seed=seed)
        best = min(best, time.perf_counter() - t0)
    return best / shape[0]


if __name__ == "__main__":  # regenerate the shipped classifier: python -m ddim_fast.metrics
    torch.set_num_threads(1)
    _, _info = train_digit_classifier()
    print(json.dumps({k: _info[k] for k in ("test_accuracy", "train_accuracy", "num_test", "sha256")}))
