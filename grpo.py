"""The hand-written GRPO maths (DESIGN §4): the clipped-surrogate loss every RL stage minimises, and the
Flow-GRPO SDE step that gives a UAE decoder's sampler a log-prob per step, with the closed-form KL of two steps.

grpo_loss reads per-element log-probs from either direction of either architecture: caption tokens
(grpo_encoder), a UAE's SDE timesteps (sde_step and step_kl, through UAE.decoder_logprobs) or a UMM2's image
tokens (grpo_decoder). Apart from the models so that the formulas read against their papers on one page.
"""
import math

import torch


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float = 0.2, clip_eps_high: float | None = None,
              beta: float = 0.04, aggregation: str = "token", kl=None, return_stats: bool = False,
              tokens_per_rank=None):
    """Clipped-surrogate GRPO loss (Shao et al. 2024, DAPO's eps_high from Yu et al. 2025), per element:

        ratio = exp(logp - old_logp)
        loss  = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + beta KL
        KL    = exp(ref - logp) - (ref - logp) - 1         (k3, unbiased, >= 0; Schulman 2020)

    logp / old_logp / ref_logp / mask are (N, L): tokens of a caption, or timesteps of a Flow-GRPO
    trajectory; advantages (N,) broadcast over L. `kl` (N, L) replaces k3 where the KL is known in
    closed form (the decoder: Gaussian means). Aggregation "token": sum over all elements / their
    count (length-neutral); "sequence": mean per row, then over rows (favours short answers).
    Data parallel, "token" divides by tokens_per_rank, the count averaged over ranks: the gradient
    averaged over ranks is then that of every rank's sum / all their tokens, whereas each rank's own
    count would weight up a rank of short captions. Computed in fp32. Returns the scalar loss, and a
    stats dict if return_stats."""
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    logp, old_logp, mask = logp.float(), old_logp.float(), mask.float()
    adv = advantages.float().view(-1, 1)
    ratio = torch.exp(logp - old_logp)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    per_elem = -torch.minimum(ratio * adv, clipped * adv)
    if kl is None and beta != 0:
        delta = ref_logp.float() - logp
        kl = torch.exp(delta) - delta - 1
    if kl is not None and beta != 0:
        per_elem = per_elem + beta * kl.float()
    if aggregation == "token":
        count = mask.sum() if tokens_per_rank is None else tokens_per_rank
        loss = (per_elem * mask).sum() / count.clamp(min=1)
    else:
        loss = ((per_elem * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if not return_stats:
        return loss
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        is_clipped = ((ratio * adv) > (clipped * adv)).float()  # the clipped branch is the one taken
        stats = {"clip_fraction": (is_clipped * mask).sum() / n, "ratio_mean": (ratio * mask).sum() / n,
                 "kl": ((kl.float() * mask).sum() / n) if kl is not None else torch.zeros(())}
    return loss, stats


def sde_step(x, v, sigma, sigma_next, noise_level: float, sigma_max, prev_sample=None, generator=None):
    """One Flow-GRPO SDE step (Liu et al. 2025, eq. 9), the reverse-time SDE with the same marginals as
    the rectified-flow ODE. dt = sigma_next - sigma < 0, std_t = a * sqrt(sigma / (1 - sigma)):
        mean = x + [v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)] dt,   x' = mean + std_t sqrt(-dt) z
    Returns (x', log N(x' | mean, step_std^2) averaged over dimensions, mean, step_std = std_t sqrt(-dt)).
    At noise_level 0 this is exactly the Euler ODE step. Pass prev_sample to score a stored x'."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    sigma, sigma_next = sigma.float().view(shape), sigma_next.float().view(shape)
    x, v, dt = x.float(), v.float(), sigma_next - sigma
    # sigma = 1 would divide by zero; Flow-GRPO uses the first sigma below 1 there
    std_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, sigma_max, sigma)))
    mean = x + (v + std_t ** 2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    step_std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev_sample = mean + step_std * noise
    if noise_level == 0:
        return prev_sample, None, mean, step_std
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * step_std ** 2) - torch.log(step_std)
                - 0.5 * math.log(2 * math.pi))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.dim()))), mean, step_std


def step_kl(mean, ref_mean, step_std) -> torch.Tensor:
    """Per-sample KL(N(mean, s^2 I) || N(ref_mean, s^2 I)) of two SDE steps with the same std s, averaged
    over dimensions: |mean - ref_mean|^2 / (2 s^2), s = std_t sqrt(|dt|) (the exact KL; Flow-GRPO's code divides
    by std_t^2 alone, so its beta is ours times 1/|dt|: DESIGN §4)."""
    return ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * step_std.flatten() ** 2)
