"""Tests of ``rlr_lightning.sampling``: the DDIM sampler, its log-probabilities, plans and perturbations.

Every reference value here is computed independently of the code under test: model outputs by calling the
UNet directly, DDIM steps with ``diffusers.DDIMScheduler.step``, log-densities with
``torch.distributions.Normal`` in float64, perturbed runs by editing the LoRA weights in place.
"""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.sampling import DDIMSampler, Perturbation, Plan, PromptEmbeds

SEQ_LEN, CROSS_DIM = 16, 32


# --------------------------------------------------------------------------------------------------------
# Helpers


def make_embeds(batch_size: int, cfg: bool, seed: int = 0) -> PromptEmbeds:
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch_size, SEQ_LEN, CROSS_DIM, generator=gen)
    uncond = torch.randn(batch_size, SEQ_LEN, CROSS_DIM, generator=gen) if cfg else None
    return PromptEmbeds(cond, uncond)


def lora_params(unet) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    return params


def clone_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def restore_params_(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])


def add_to_params_(params: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], sign: float = 1.0):
    with torch.no_grad():
        for n, p in params.items():
            p.add_(sign * delta[n])


def reference_scheduler(tiny_scheduler, num_steps: int, **overrides):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(tiny_scheduler.config, **overrides)
    sched.set_timesteps(num_steps)
    return sched


@torch.no_grad()
def reference_model_output(unet, x: torch.Tensor, t, embeds: PromptEmbeds, guidance_scale: float):
    """The (guided) noise prediction, computed by calling the UNet directly."""
    if guidance_scale == 1:
        return unet(x, t, encoder_hidden_states=embeds.cond, return_dict=False)[0]
    both = unet(
        torch.cat([x, x]), t, encoder_hidden_states=torch.cat([embeds.uncond, embeds.cond]), return_dict=False
    )[0]
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def reference_step(sched, model_output, t, x, eta, noise):
    """``(mean, next_latents)`` of ``DDIMScheduler.step``."""
    mean = sched.step(model_output, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
    nxt = sched.step(model_output, t, x, eta=eta, variance_noise=noise).prev_sample
    return mean, nxt


def normal_log_prob(sample, mean, sigma) -> torch.Tensor:
    """Independent float64 Gaussian log-density, summed over all non-batch dims."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (sample.dim() - 1)))
    dist = torch.distributions.Normal(mean.double(), sigma.expand_as(mean).double())
    return dist.log_prob(sample.double()).flatten(1).sum(1)


def fixed_noise(sampler: DDIMSampler, batch_size: int, seed: int):
    return sampler.initial_noise(batch_size, torch.Generator().manual_seed(seed))


class SavedTensorCounter:
    """Counts tensors saved for backward while active."""

    def __init__(self) -> None:
        self.count = 0

    def _pack(self, tensor):
        self.count += 1
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def assert_trajectories_equal(a, b) -> None:
    assert len(a.latents) == len(b.latents)
    for la, lb in zip(a.latents, b.latents):
        assert torch.equal(la, lb)
    assert torch.equal(a.noises, b.noises)
    assert torch.equal(a.log_probs, b.log_probs)
    assert torch.equal(a.final.detach(), b.final.detach())


# --------------------------------------------------------------------------------------------------------
# 1. Agreement with diffusers' DDIMScheduler.step


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_step_matches_diffusers_ddim_step(tiny_unet, tiny_scheduler, eta, guidance_scale):
    T, B = 5, 2
    embeds = make_embeds(B, cfg=guidance_scale > 1)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=eta, guidance_scale=guidance_scale)
    ref = reference_scheduler(tiny_scheduler, T)

    assert torch.equal(sampler.schedule.timesteps, ref.timesteps.long())
    step_ratio = ref.config.num_train_timesteps // T
    for k, t in enumerate(ref.timesteps.tolist()):
        expected_sigma = eta * ref._get_variance(t, t - step_ratio) ** 0.5
        torch.testing.assert_close(sampler.schedule.sigma[k], expected_sigma.float(), rtol=1e-6, atol=1e-7)
    assert bool((sampler.schedule.sigma > 0).all())

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        traj = sampler.run(Plan(T), embeds, generator=gen)
        for k in (0, 2, T - 1):
            t = ref.timesteps[k]
            x = traj.latents[k]
            model_out = reference_model_output(tiny_unet, x, t, embeds, guidance_scale)
            ref_mean, ref_next = reference_step(ref, model_out, t, x, eta, traj.noises[k])
            # The sampling run itself produced diffusers' next latent from the stored noise.
            torch.testing.assert_close(traj.latents[k + 1], ref_next, rtol=1e-5, atol=1e-5)
            # A single step on fresh inputs: mean and next latent.
            x_new = torch.randn(x.shape, generator=gen)
            noise = torch.randn(x.shape, generator=gen)
            out = sampler.step(k, x_new, embeds, noise=noise)
            model_out = reference_model_output(tiny_unet, x_new, t, embeds, guidance_scale)
            ref_mean, ref_next = reference_step(ref, model_out, t, x_new, eta, noise)
            torch.testing.assert_close(out.mean, ref_mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.next_latents, ref_next, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.sigma, sampler.schedule.sigma[k].expand(B))
            # The noise actually enters (sigma is not silently zero).
            assert (out.next_latents - out.mean).abs().max() > 1e-3


def test_guidance_changes_the_step(tiny_unet, tiny_scheduler):
    """Guidance on and off are different computations (so the CFG checks above discriminate)."""
    T, B = 4, 2
    embeds = make_embeds(B, cfg=True)
    x, noises = fixed_noise(DDIMSampler(tiny_unet, tiny_scheduler, T, eta=1.0), B, seed=3)
    with torch.no_grad():
        plain = DDIMSampler(tiny_unet, tiny_scheduler, T, eta=1.0).step(1, x, embeds, noise=noises[1])
        guided = DDIMSampler(tiny_unet, tiny_scheduler, T, eta=1.0, guidance_scale=5.0).step(
            1, x, embeds, noise=noises[1]
        )
    assert (plain.mean - guided.mean).abs().max() > 1e-3


def test_v_prediction_matches_diffusers(tiny_unet, tiny_scheduler):
    T, B, eta, w = 4, 2, 1.0, 3.0
    from diffusers import DDIMScheduler

    v_sched = DDIMScheduler.from_config(tiny_scheduler.config, prediction_type="v_prediction")
    sampler = DDIMSampler(tiny_unet, v_sched, num_steps=T, eta=eta, guidance_scale=w)
    assert sampler.schedule.prediction_type == "v_prediction"
    ref_v = reference_scheduler(tiny_scheduler, T, prediction_type="v_prediction")
    ref_eps = reference_scheduler(tiny_scheduler, T)
    embeds = make_embeds(B, cfg=True)
    x0, noises = fixed_noise(sampler, B, seed=5)
    with torch.no_grad():
        traj = sampler.run(Plan(T), embeds, initial_latents=x0, noises=noises)
        for k in range(T):
            t = ref_v.timesteps[k]
            x = traj.latents[k]
            model_out = reference_model_output(tiny_unet, x, t, embeds, w)
            ref_mean, ref_next = reference_step(ref_v, model_out, t, x, eta, noises[k])
            out = sampler.step(k, x, embeds, noise=noises[k])
            torch.testing.assert_close(out.mean, ref_mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(traj.latents[k + 1], ref_next, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.log_prob, traj.log_probs[k], rtol=1e-5, atol=1e-4)
            expected = normal_log_prob(traj.latents[k + 1], ref_mean, out.sigma)
            torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-4, atol=1e-2)
        # The epsilon interpretation of the same model output is a different step.
        t = ref_v.timesteps[1]
        model_out = reference_model_output(tiny_unet, traj.latents[1], t, embeds, w)
        eps_mean, _ = reference_step(ref_eps, model_out, t, traj.latents[1], eta, noises[1])
        v_mean = sampler.step(1, traj.latents[1], embeds, noise=noises[1]).mean
        assert (eps_mean - v_mean).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------
# 2. Log-probabilities


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no_cfg", "cfg"])
def test_log_prob_is_the_gaussian_density(tiny_unet, tiny_scheduler, guidance_scale):
    T, B, eta = 5, 3, 1.0
    embeds = make_embeds(B, cfg=guidance_scale > 1)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=eta, guidance_scale=guidance_scale)
    ref = reference_scheduler(tiny_scheduler, T)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        traj = sampler.run(Plan(T), embeds, generator=gen)
        assert traj.log_probs.shape == (T, B)
        for k in range(T):
            x, x_next = traj.latents[k], traj.latents[k + 1]
            sigma = sampler.schedule.sigma[k]
            # Exact formula check against the sampler's own mean, in float64.
            out = sampler.step(k, x, embeds, prev_latents=x_next)
            assert torch.equal(out.next_latents, x_next)
            expected = normal_log_prob(x_next, out.mean, sigma)
            torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-3)
            torch.testing.assert_close(traj.log_probs[k].double(), expected, rtol=1e-5, atol=1e-3)
            # Fully independent check: the mean from diffusers.
            model_out = reference_model_output(tiny_unet, x, ref.timesteps[k], embeds, guidance_scale)
            ref_mean, _ = reference_step(ref, model_out, ref.timesteps[k], x, eta, traj.noises[k])
            torch.testing.assert_close(
                traj.log_probs[k].double(), normal_log_prob(x_next, ref_mean, sigma), rtol=1e-4, atol=1e-2
            )
        # A transition that is not the one sampled scores differently (the density depends on s_{k+1}).
        other = sampler.step(1, traj.latents[1], embeds, prev_latents=traj.latents[1]).log_prob
        assert (other - traj.log_probs[1]).abs().min() > 1.0


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no_cfg", "cfg"])
def test_batched_log_probs_match_sampling_time(tiny_unet, tiny_scheduler, guidance_scale):
    T, B = 6, 2
    embeds = make_embeds(B, cfg=guidance_scale > 1, seed=4)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=0.7, guidance_scale=guidance_scale)
    with torch.no_grad():
        traj = sampler.run(Plan(T), embeds, generator=torch.Generator().manual_seed(6))
        steps = [4, 0, 5, 2]  # unsorted, first and last included
        index, x, x_next = traj.transitions(steps)
        assert torch.equal(index, torch.tensor(steps).repeat_interleave(B))
        lp = sampler.log_probs(index, x, x_next, embeds.repeat(len(steps)))
    assert lp.shape == (len(steps) * B,)
    assert not lp.requires_grad
    torch.testing.assert_close(lp, traj.log_probs[steps].reshape(-1), rtol=1e-5, atol=1e-3)
    # Independent float64 density from diffusers' means, one row at a time.
    ref = reference_scheduler(tiny_scheduler, T)
    for row in range(len(steps) * B):
        k, b = steps[row // B], row % B
        t = ref.timesteps[k]
        e = embeds.select(slice(b, b + 1))
        model_out = reference_model_output(tiny_unet, x[row : row + 1], t, e, guidance_scale)
        mean, _ = reference_step(ref, model_out, t, x[row : row + 1], 0.7, torch.zeros_like(model_out))
        expected = normal_log_prob(x_next[row : row + 1], mean, sampler.schedule.sigma[k])
        torch.testing.assert_close(lp[row : row + 1].double(), expected, rtol=1e-4, atol=1e-2)


def test_batched_log_probs_are_differentiable_and_match_window(tiny_unet, tiny_scheduler):
    """With gradient, the batched re-score has the same value and LoRA gradient as the window's log-prob."""
    T, B = 4, 2
    embeds = make_embeds(B, cfg=True)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0, guidance_scale=5.0)
    params = lora_params(tiny_unet)
    traj = sampler.run(Plan(T, windows=[(2, 3)]), embeds, generator=torch.Generator().manual_seed(0))
    g_window = torch.autograd.grad(traj.window_log_probs[2].sum(), list(params.values()))
    index, x, x_next = traj.transitions([2])
    lp = sampler.log_probs(index, x, x_next, embeds)
    assert lp.requires_grad
    torch.testing.assert_close(lp, traj.window_log_probs[2].detach(), rtol=1e-5, atol=1e-4)
    g_batched = torch.autograd.grad(lp.sum(), list(params.values()))
    num = sum((a - b).pow(2).sum() for a, b in zip(g_window, g_batched)).sqrt()
    den = sum(a.pow(2).sum() for a in g_window).sqrt()
    assert den > 0
    assert num / den < 1e-4


# --------------------------------------------------------------------------------------------------------
# 3. Graphs: none outside windows, exactly one window's worth inside


def _count_saved(sampler, plan, embeds, x0, noises):
    with torch.enable_grad(), SavedTensorCounter() as counter:
        traj = sampler.run(plan, embeds, initial_latents=x0, noises=noises)
    return counter.count, traj


def test_no_window_keeps_no_graph(tiny_unet, tiny_scheduler):
    T, B = 4, 2
    embeds = make_embeds(B, cfg=True)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0, guidance_scale=5.0)
    x0, noises = fixed_noise(sampler, B, seed=0)
    count, traj = _count_saved(sampler, Plan(T), embeds, x0.requires_grad_(True), noises)
    assert count == 0
    assert not traj.final.requires_grad
    assert traj.window_means == {} and traj.window_log_probs == {}
    assert not traj.log_probs.requires_grad
    assert all(not x.requires_grad for x in traj.latents)


def test_window_graph_size_is_independent_of_T_and_linear_in_length(tiny_unet, tiny_scheduler):
    B = 2
    embeds = make_embeds(B, cfg=True)

    def count(T, windows):
        sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0, guidance_scale=5.0)
        x0, noises = fixed_noise(sampler, B, seed=0)
        n, _ = _count_saved(sampler, Plan(T, windows=windows), embeds, x0, noises)
        return n

    one_short = count(4, [(1, 2)])
    one_long = count(8, [(1, 2)])
    one_late = count(8, [(7, 8)])
    two = count(8, [(1, 3)])
    three = count(8, [(1, 4)])
    assert one_short > 0
    assert one_short == one_long == one_late
    assert two / one_long == pytest.approx(2.0, abs=0.2)
    # Each further window step adds the same amount: memory is linear in the window length.
    assert three - two == two - one_long


def test_window_records_only_its_steps(tiny_unet, tiny_scheduler):
    T, B = 6, 2
    embeds = make_embeds(B, cfg=True)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0, guidance_scale=5.0)
    params = lora_params(tiny_unet)
    x0, noises = fixed_noise(sampler, B, seed=1)
    x0 = x0.requires_grad_(True)
    traj = sampler.run(Plan(T, windows=[(2, 4)]), embeds, initial_latents=x0, noises=noises)

    assert sorted(traj.window_means) == [2, 3]
    assert sorted(traj.window_log_probs) == [2, 3]
    for k in (2, 3):
        assert traj.window_means[k].requires_grad
        assert traj.window_log_probs[k].requires_grad
        assert traj.window_log_probs[k].shape == (B,)
    assert all(not x.requires_grad for x in traj.latents)
    assert not traj.log_probs.requires_grad
    assert not traj.final.requires_grad  # the window ends before the last step
    # The recorded values are the same as those of a graph-free run.
    with torch.no_grad():
        plain = sampler.run(Plan(T), embeds, initial_latents=x0, noises=noises)
    assert_trajectories_equal(traj, plain)

    # The window's last log-prob reaches the LoRA weights ...
    grads = torch.autograd.grad(
        traj.window_log_probs[3].sum(), list(params.values()), allow_unused=True, retain_graph=True
    )
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # ... pathwise through the earlier window step (its input s_3 was computed from m_2) ...
    (g_m2,) = torch.autograd.grad(traj.window_log_probs[3].sum(), traj.window_means[2], retain_graph=True)
    assert g_m2.abs().sum() > 0
    # ... but not into the initial latents, which the window starts from detached.
    (g_x0,) = torch.autograd.grad(traj.window_log_probs[3].sum(), x0, allow_unused=True)
    assert g_x0 is None


def test_adjacent_windows_do_not_backpropagate_into_each_other(tiny_unet, tiny_scheduler):
    T, B = 5, 2
    embeds = make_embeds(B, cfg=False)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0)
    traj = sampler.run(Plan(T, windows=[(0, 2), (2, 4)]), embeds, generator=torch.Generator().manual_seed(0))
    assert sorted(traj.window_means) == [0, 1, 2, 3]
    # Inside a window: pathwise.
    (g_in,) = torch.autograd.grad(traj.window_means[3].sum(), traj.window_means[2], retain_graph=True)
    assert g_in.abs().sum() > 0
    (g_in,) = torch.autograd.grad(traj.window_log_probs[1].sum(), traj.window_means[0], retain_graph=True)
    assert g_in.abs().sum() > 0
    # Across the window boundary: the second window starts from the detached s_2.
    (g_across,) = torch.autograd.grad(
        traj.window_log_probs[3].sum(), traj.window_means[1], allow_unused=True, retain_graph=True
    )
    assert g_across is None
    (g_across,) = torch.autograd.grad(traj.window_means[2].sum(), traj.window_means[0], allow_unused=True)
    assert g_across is None


def test_full_window_is_pathwise_gradient(tiny_unet, tiny_scheduler):
    """A window [(0, T)] gives d s_T / d theta, checked with central finite differences."""
    T, B = 3, 2
    embeds = make_embeds(B, cfg=True)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0, guidance_scale=3.0)
    params = lora_params(tiny_unet)
    names = list(params)
    x0, noises = fixed_noise(sampler, B, seed=2)
    gen = torch.Generator().manual_seed(9)
    weights = torch.randn(x0.shape, generator=gen)
    direction = {n: torch.randn(params[n].shape, generator=gen) for n in names}

    def objective(final):
        return (final * weights).sum()

    traj = sampler.run(Plan(T, windows=[(0, T)]), embeds, initial_latents=x0, noises=noises)
    assert traj.final.requires_grad
    assert sorted(traj.window_means) == list(range(T))
    grads = torch.autograd.grad(objective(traj.final), [params[n] for n in names])
    analytic = sum((g * direction[n]).sum() for g, n in zip(grads, names)).item()

    saved = clone_params(params)
    eps = 1e-3
    values = []
    for sign in (1.0, -1.0):
        add_to_params_(params, {n: eps * direction[n] for n in names}, sign)
        with torch.no_grad():
            final = sampler.run(Plan(T), embeds, initial_latents=x0, noises=noises).final
            values.append(objective(final).item())
        restore_params_(params, saved)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic) > 1e-2
    assert abs(analytic - numeric) <= 1e-2 * abs(numeric)


# --------------------------------------------------------------------------------------------------------
# 4. Parameter perturbations


def test_perturbation_noise_is_regenerated_from_its_seed(tiny_unet):
    params = lora_params(tiny_unet)
    a = Perturbation(seed=11, scale=0.01).noise(params)
    b = Perturbation(seed=11, scale=0.01).noise(params)
    c = Perturbation(seed=12, scale=0.01).noise(params)
    assert set(a) == set(params)
    for n, p in params.items():
        assert a[n].shape == p.shape and a[n].dtype == p.dtype
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])
    flat = torch.cat([a[n].flatten() for n in sorted(a)])
    assert abs(flat.std().item() - 0.01) < 0.001
    # Regenerated identically whatever the order the mapping is given in.
    reordered = dict(reversed(list(params.items())))
    d = Perturbation(seed=11, scale=0.01).noise(reordered)
    assert all(torch.equal(a[n], d[n]) for n in params)
    with pytest.raises(ValueError, match="scale.*0"):
        Perturbation(seed=0, scale=0.0)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no_cfg", "cfg"])
def test_perturbed_step_equals_in_place_weights(tiny_unet, tiny_scheduler, guidance_scale):
    T, B, k_pert = 4, 2, 1
    embeds = make_embeds(B, cfg=guidance_scale > 1)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0, guidance_scale=guidance_scale)
    params = lora_params(tiny_unet)
    before = clone_params(params)
    pert = Perturbation(seed=5, scale=0.05)
    x0, noises = fixed_noise(sampler, B, seed=3)

    traj = sampler.run(Plan(T, perturbations={k_pert: pert}), embeds, initial_latents=x0, noises=noises)
    assert all(torch.equal(p, before[n]) for n, p in params.items())

    # Manual: the same steps, with u added to the weights in place for step k_pert only.
    u = pert.noise(params)
    x = x0
    manual = [x0]
    with torch.no_grad():
        for k in range(T):
            if k == k_pert:
                add_to_params_(params, u)
            out = sampler.step(k, x, embeds, noise=noises[k])
            if k == k_pert:
                restore_params_(params, before)
            x = out.next_latents
            manual.append(x)
    for k in range(T + 1):
        torch.testing.assert_close(traj.latents[k], manual[k], rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        plain = sampler.run(Plan(T), embeds, initial_latents=x0, noises=noises)
    assert torch.equal(plain.latents[k_pert], traj.latents[k_pert])
    assert (plain.latents[k_pert + 1] - traj.latents[k_pert + 1]).abs().max() > 1e-4
    assert all(torch.equal(p, before[n]) for n, p in params.items())


def test_antithetic_perturbation_halves(tiny_unet, tiny_scheduler):
    T, B, k_pert = 3, 4, 1
    embeds = make_embeds(B, cfg=True, seed=8)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0, guidance_scale=5.0)
    params = lora_params(tiny_unet)
    before = clone_params(params)
    pert = Perturbation(seed=21, scale=0.05, antithetic=True)
    x0, noises = fixed_noise(sampler, B, seed=4)

    with torch.no_grad():
        traj = sampler.run(Plan(T, perturbations={k_pert: pert}), embeds, initial_latents=x0, noises=noises)
    assert all(torch.equal(p, before[n]) for n, p in params.items())

    # Manual: the whole batch run with the weights edited in place to theta + u, then to theta - u, at step
    # k_pert only; the first half of the antithetic run must match the former, the second half the latter.
    u = Perturbation(seed=21, scale=0.05).noise(params)
    half = B // 2
    for sl, sign in ((slice(0, half), 1.0), (slice(half, B), -1.0)):
        x = x0
        with torch.no_grad():
            for k in range(T):
                if k == k_pert:
                    add_to_params_(params, u, sign)
                x = sampler.step(k, x, embeds, noise=noises[k]).next_latents
                if k == k_pert:
                    restore_params_(params, before)
                torch.testing.assert_close(traj.latents[k + 1][sl], x[sl], rtol=1e-5, atol=1e-5)
    # The halves really ran at different points: identical inputs to the same prompts differ only by +-u.
    mirrored = PromptEmbeds(embeds.cond[:half].repeat(2, 1, 1), embeds.uncond[:half].repeat(2, 1, 1))
    x_same = x0[:half].repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = sampler.step(k_pert, x_same, mirrored, noise=torch.zeros_like(x_same), perturbation=pert)
    assert (out.mean[:half] - out.mean[half:]).abs().max() > 1e-4


def test_gradient_at_perturbed_step_is_wrt_unperturbed_leaves(tiny_unet, tiny_scheduler):
    T, B, k_pert = 4, 2, 2
    embeds = make_embeds(B, cfg=True)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0, guidance_scale=5.0)
    params = lora_params(tiny_unet)
    names = list(params)
    before = clone_params(params)
    pert = Perturbation(seed=3, scale=0.05)
    x0, noises = fixed_noise(sampler, B, seed=5)

    def grads_of(traj):
        gs = torch.autograd.grad(traj.window_log_probs[k_pert].sum(), [params[n] for n in names])
        return torch.cat([g.flatten() for g in gs])

    plan = Plan(T, windows=[(k_pert, k_pert + 1)], perturbations={k_pert: pert})
    traj = sampler.run(plan, embeds, initial_latents=x0, noises=noises)
    g_pert = grads_of(traj)
    assert all(torch.equal(p, before[n]) for n, p in params.items())

    # Reference: the same step from the same stored s_k, with the weights actually set to theta + u in place
    # and no perturbation at all.
    def step_grads():
        out = sampler.step(k_pert, traj.latents[k_pert], embeds, noise=noises[k_pert])
        gs = torch.autograd.grad(out.log_prob.sum(), [params[n] for n in names])
        return out, torch.cat([g.flatten() for g in gs])

    add_to_params_(params, pert.noise(params))
    try:
        ref_out, g_ref = step_grads()
    finally:
        restore_params_(params, before)
    torch.testing.assert_close(traj.window_log_probs[k_pert], ref_out.log_prob, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(traj.window_means[k_pert], ref_out.mean, rtol=1e-5, atol=1e-5)
    assert (g_pert - g_ref).norm() <= 1e-5 * g_ref.norm()

    # And it is not the gradient at the unperturbed point.
    _, g_plain = step_grads()
    assert (g_plain - g_ref).norm() > 1e-2 * g_ref.norm()
    assert all(torch.equal(p, before[n]) for n, p in params.items())


# --------------------------------------------------------------------------------------------------------
# 5. Replay


def test_same_generator_replays_whatever_the_plan(tiny_unet, tiny_scheduler):
    T, B = 5, 2
    embeds = make_embeds(B, cfg=True)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0, guidance_scale=5.0)
    plans = [Plan(T), Plan(T, windows=[(1, 3)]), Plan(T, windows=[(0, 2), (3, T)]), Plan(T, windows=[(0, T)])]
    trajs = [sampler.run(p, embeds, generator=torch.Generator().manual_seed(42)) for p in plans]
    for other in trajs[1:]:
        assert_trajectories_equal(trajs[0], other)
    # Noise is drawn up front, s_0 first, then eps_0 .. eps_{T-1}.
    x0, noises = sampler.initial_noise(B, torch.Generator().manual_seed(42))
    assert torch.equal(trajs[0].latents[0], x0)
    assert torch.equal(trajs[0].noises, noises)
    sample = sampler.sample(embeds, generator=torch.Generator().manual_seed(42))
    assert torch.equal(sample, trajs[0].final)
    # A different seed is a different trajectory.
    other = sampler.run(Plan(T), embeds, generator=torch.Generator().manual_seed(43))
    assert not torch.equal(other.final, trajs[0].final)


def test_given_noises_reproduce_a_trajectory(tiny_unet, tiny_scheduler):
    T, B = 4, 3
    embeds = make_embeds(B, cfg=False)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=0.5)
    with torch.no_grad():
        traj = sampler.run(Plan(T), embeds, generator=torch.Generator().manual_seed(7))
        replay = sampler.run(Plan(T), embeds, initial_latents=traj.latents[0], noises=traj.noises)
        x0, noises = traj.latents[0].clone(), traj.noises.clone()
        windowed = sampler.run(Plan(T, windows=[(2, 4)]), embeds, initial_latents=x0, noises=noises)
    assert_trajectories_equal(traj, replay)
    assert_trajectories_equal(traj, windowed)


# --------------------------------------------------------------------------------------------------------
# 6. Errors that name the bad value


def test_invalid_sampler_arguments(tiny_unet, tiny_scheduler):
    with pytest.raises(ValueError, match=r"num_steps.*\b0\b"):
        DDIMSampler(tiny_unet, tiny_scheduler, num_steps=0, eta=1.0)
    with pytest.raises(ValueError, match=r"eta.*-0\.5"):
        DDIMSampler(tiny_unet, tiny_scheduler, num_steps=4, eta=-0.5)
    with pytest.raises(ValueError, match=r"guidance_scale.*0\.5"):
        DDIMSampler(tiny_unet, tiny_scheduler, num_steps=4, eta=1.0, guidance_scale=0.5)


def test_guidance_needs_unconditional_embeddings(tiny_unet, tiny_scheduler):
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=3, eta=1.0, guidance_scale=5.0)
    with pytest.raises(ValueError, match=r"guidance_scale=5\.0.*uncond"):
        sampler.run(Plan(3), make_embeds(2, cfg=False), generator=torch.Generator().manual_seed(0))


def test_mismatched_batch_sizes(tiny_unet, tiny_scheduler):
    T = 3
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=1.0)
    embeds = make_embeds(2, cfg=False)
    x0, noises = fixed_noise(sampler, 3, seed=0)
    with pytest.raises(ValueError, match=r"2 prompts.*initial latents \(3,"):
        sampler.run(Plan(T), embeds, initial_latents=x0, noises=noises)
    with pytest.raises(ValueError, match=r"2 prompts.*initial latents \(3,"):
        sampler.run(Plan(T), embeds, initial_latents=x0)
    with pytest.raises(ValueError, match=r"latents 3, prompt embeddings 2"):
        sampler.step(0, x0, embeds, noise=noises[0])
    with pytest.raises(ValueError, match=r"even batch size, got 3"):
        antithetic = Plan(T, perturbations={0: Perturbation(seed=0, scale=0.1, antithetic=True)})
        sampler.run(antithetic, make_embeds(3, cfg=False), initial_latents=x0, noises=noises)


def test_invalid_plans(tiny_unet, tiny_scheduler):
    with pytest.raises(ValueError, match=r"\[2, 5\).*\[0, 4\)"):
        Plan(4, windows=[(2, 5)])
    with pytest.raises(ValueError, match=r"\[-1, 1\)"):
        Plan(4, windows=[(-1, 1)])
    with pytest.raises(ValueError, match=r"\[2, 2\)"):
        Plan(4, windows=[(2, 2)])
    with pytest.raises(ValueError, match=r"overlap.*\(0, 3\).*\(2, 4\)"):
        Plan(6, windows=[(2, 4), (0, 3)])
    with pytest.raises(ValueError, match=r"\[4\]"):
        Plan(4, perturbations={4: Perturbation(seed=0, scale=0.1)})
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=4, eta=1.0)
    with pytest.raises(ValueError, match=r"5 steps.*runs 4"):
        sampler.run(Plan(5), make_embeds(2, cfg=False), generator=torch.Generator().manual_seed(0))


def test_log_probs_need_positive_eta(tiny_unet, tiny_scheduler):
    T, B = 3, 2
    embeds = make_embeds(B, cfg=False)
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=T, eta=0.0)
    with torch.no_grad():
        traj = sampler.run(Plan(T), embeds, generator=torch.Generator().manual_seed(0))
    assert bool(traj.log_probs.isnan().all())
    index, x, x_next = traj.transitions([0, 2])
    with pytest.raises(ValueError, match=r"eta > 0"):
        sampler.log_probs(index, x, x_next, embeds.repeat(2))


def test_under_autocast_lora_weights_are_cast_once_per_no_grad_run_with_the_same_samples(tiny_pipeline_dir):
    """bf16 weights, float32 LoRA and bf16 autocast (Lightning's bf16-mixed), on the CPU: a run casts the LoRA
    weights once per stretch of no-grad steps, not on every call, and samples what per-call casting samples."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlr_lightning.models import LoraSettings
    from rlr_lightning.task import SamplingSettings, Task
    from tests.conftest import perturb_lora_

    class Casts(TorchDispatchMode):
        """Counts conversions between float32 and bfloat16: all of them, and those of the LoRA weights."""

        def __init__(self, pointers) -> None:
            super().__init__()
            self.pointers, self.count, self.weights = pointers, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            floats = {torch.float32, torch.bfloat16}
            if (
                func is torch.ops.aten._to_copy.default
                and {args[0].dtype, (kwargs or {}).get("dtype")} == floats
            ):
                self.count += 1
                self.weights += args[0].data_ptr() in self.pointers
            return func(*args, **(kwargs or {}))

    T = 6
    settings = SamplingSettings(num_steps=T, eta=1.0, guidance_scale=3.0)
    task = Task.build(str(tiny_pipeline_dir), settings, LoraSettings(), weight_dtype=torch.bfloat16, seed=0)
    perturb_lora_(task.backbone, seed=1)
    sampler, lora = task.sampler, task.backbone.lora_parameters()
    pointers = {p.data_ptr() for p in lora.values()}
    before = {name: (p.data_ptr(), p.dtype) for name, p in lora.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeds = task.conditioning_for(["a red circle", "two blue squares"])
        x0, noises = sampler.initial_noise(2, torch.Generator().manual_seed(0), "cpu")
        per_call, x = Casts(pointers), x0
        with per_call, torch.no_grad():  # the steps one by one: autocast casts at every LoRA call
            for k in range(T):
                x = sampler.step(k, x, embeds.at(k), noise=noises[k]).next_latents
        once = Casts(pointers)
        with once:
            final = sampler.run(Plan(T), embeds, initial_latents=x0, noises=noises).final
    assert torch.equal(final, x)
    # Autocast caches its casts of the weights themselves; per call, each LoRA layer still casts its input to
    # float32 (peft, to the weights' dtype) and back (autocast): two copies per layer (two weights) per step.
    assert once.weights == len(lora)
    assert per_call.count - once.count >= (T - 1) * len(lora)
    # The float32 weights are back, the same tensors.
    assert {name: (p.data_ptr(), p.dtype) for name, p in lora.items()} == before

    # A window with gradient keeps the float32 leaves: its gradients are those of the step-by-step run.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run = sampler.run(Plan(T, windows=((3, 4),)), embeds, initial_latents=x0, noises=noises)
        grads = torch.autograd.grad(run.window_means[3].float().sum(), list(lora.values()), allow_unused=True)
        with torch.no_grad():
            x = x0
            for k in range(3):
                x = sampler.step(k, x, embeds.at(k), noise=noises[k]).next_latents
        mean = sampler.step(3, x, embeds.at(3), noise=noises[3]).mean
        expected = torch.autograd.grad(mean.float().sum(), list(lora.values()), allow_unused=True)
    assert any(g is not None for g in grads)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, expected))


@pytest.mark.slow
def test_a_compiled_denoiser_samples_what_the_eager_one_samples_and_keeps_gradients_eager(tiny_pipeline_dir):
    from rlr_lightning.models import LoraSettings
    from rlr_lightning.task import SamplingSettings, Task
    from tests.conftest import perturb_lora_

    T = 4
    settings = SamplingSettings(num_steps=T, eta=1.0, guidance_scale=3.0)
    task = Task.build(str(tiny_pipeline_dir), settings, LoraSettings(), seed=0)
    perturb_lora_(task.backbone, seed=1)
    sampler, lora = task.sampler, task.backbone.lora_parameters()
    embeds = task.conditioning_for(["a red circle", "two blue squares"])
    x0, noises = sampler.initial_noise(2, torch.Generator().manual_seed(0), "cpu")

    def sample_and_window_grads():
        run = sampler.run(Plan(T, windows=((2, 3),)), embeds, initial_latents=x0, noises=noises)
        grads = torch.autograd.grad(run.window_means[2].sum(), list(lora.values()), allow_unused=True)
        return run.final, grads

    eager_final, eager_grads = sample_and_window_grads()
    sampler.denoiser.compile()
    compiled_final, compiled_grads = sample_and_window_grads()
    # The no-grad steps ran compiled (fused kernels round differently); the window with gradient ran eagerly,
    # from latents that differ by that rounding only.
    torch.testing.assert_close(compiled_final, eager_final, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)

    # A LoRA update is seen by the compiled module (it shares the weights): one step at the new weights, compiled
    # and eager.
    def one_step(compiled: bool) -> torch.Tensor:
        keep, sampler.denoiser._compiled = (
            sampler.denoiser._compiled,
            sampler.denoiser._compiled if compiled else None,
        )
        try:
            with torch.no_grad():
                return sampler.step(1, x0, embeds.at(1), noise=noises[1]).next_latents
        finally:
            sampler.denoiser._compiled = keep

    before = one_step(True)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora.values():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    after = one_step(True)
    assert (after - before).abs().max() > 0.1
    torch.testing.assert_close(after, one_step(False), rtol=1e-4, atol=1e-4)
