"""Training-time model code: the DDPM/DDIM UNet."""

from ddim_fast.nn.unet import UNet, timestep_embedding

__all__ = ["UNet", "timestep_embedding", "model_fingerprint"]


def model_fingerprint(model) -> str:
    """First 16 hex digits of a SHA-256 over a module's state dict (names, dtypes, bytes)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
