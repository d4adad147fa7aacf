"""A denoiser far smaller than the tiny UNet, for the statistical tests of the estimators (test-only)."""

from types import SimpleNamespace

import torch


class ToyDenoiser(torch.nn.Module):
    """A denoiser far smaller than the tiny UNet, with the UNet's calling convention, for statistical tests.

    Latents are ``(B, channels, size, size)``; the prediction mixes the flattened latent, a sinusoidal
    timestep embedding and the mean prompt embedding through layers named like attention projections
    (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), so peft LoRA attaches with the same target names.

    Args:
        channels: Latent channels.
        size: Latent height and width.
        context_dim: Width of the prompt embeddings.
        hidden: Hidden width.
    """

    def __init__(self, channels: int = 2, size: int = 2, context_dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        dim = channels * size * size
        self.config = SimpleNamespace(in_channels=channels, sample_size=size, cross_attention_dim=context_dim)
        self.to_q = torch.nn.Linear(dim, hidden)
        self.to_k = torch.nn.Linear(16, hidden)
        self.to_v = torch.nn.Linear(context_dim, hidden)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(hidden, dim)])

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True):
        B = sample.shape[0]
        t = timestep.to(sample.dtype).reshape(-1, 1).expand(B, 1)
        freqs = torch.exp(-torch.arange(8, device=sample.device, dtype=sample.dtype) * (9.0 / 8)).unsqueeze(0)
        t_emb = torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)], dim=1)
        h = torch.tanh(
            self.to_q(sample.flatten(1)) + self.to_k(t_emb) + self.to_v(encoder_hidden_states.mean(1))
        )
        out = self.to_out[0](h).reshape(sample.shape)
        return SimpleNamespace(sample=out) if return_dict else (out,)


def toy_denoiser_with_lora(seed: int = 0, rank: int = 2, lora_scale: float = 0.3, **kwargs) -> ToyDenoiser:
    """A frozen :class:`ToyDenoiser` with peft LoRA adapters moved off their initialisation (B = 0 there)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = ToyDenoiser(**kwargs)
    model.requires_grad_(False)
    model = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), model
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
                p.add_(torch.randn(p.shape, generator=gen) * lora_scale)
    return model.eval()
