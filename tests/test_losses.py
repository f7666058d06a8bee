"""The diffusion-loss equations in training/losses.py, each on its own against diffusers' scheduler or by hand."""

import pytest
import torch
from diffusers import DDPMScheduler

from subjectops.training import losses
from subjectops.training.losses import NoiseSchedule


def _schedule(prediction_type="epsilon"):
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    return sched, NoiseSchedule.from_scheduler(sched)


def _draw(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 421, 999])


def test_noising_and_velocity_match_diffusers():
    sched, schedule = _schedule("v_prediction")
    z0, eps, t = _draw()
    torch.testing.assert_close(losses.add_noise(schedule, z0, eps, t), sched.add_noise(z0, eps, t), rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(losses.diffusion_target(schedule, z0, eps, t), sched.get_velocity(z0, eps, t),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_estimate_inverts_noising_given_the_true_target(prediction_type):
    """A perfect prediction gives back z0 exactly: a sign or scale slip in either function breaks this."""
    _, schedule = _schedule(prediction_type)
    z0, eps, t = _draw(1)
    t = torch.tensor([1, 421, 900])  # a_t near 0 (t = 999) divides by ~0.07: kept out for a float32 tolerance
    noisy = losses.add_noise(schedule, z0, eps, t)
    target = losses.diffusion_target(schedule, z0, eps, t)
    torch.testing.assert_close(losses.predict_x0(schedule, noisy, target, t), z0, rtol=1e-4, atol=1e-4)
    expected_target = {"epsilon": eps, "sample": z0}.get(prediction_type)
    if expected_target is not None:
        assert torch.equal(target, expected_target)


def test_per_sample_mse_and_weight_map_by_hand():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    assert losses.per_sample_mse(pred, target).tolist() == [1.0, 1.0]
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert losses.per_sample_mse(pred, target, mask).tolist() == [0.25, 1.0]


@pytest.mark.parametrize("prediction_type, expected", [
    ("epsilon", lambda snr: torch.clamp(snr, max=5.0) / snr),
    ("v_prediction", lambda snr: torch.clamp(snr, max=5.0) / (snr + 1)),
    ("sample", lambda snr: torch.clamp(snr, max=5.0)),
])
def test_min_snr_weights_per_prediction_type(prediction_type, expected):
    sched, schedule = _schedule(prediction_type)
    t = torch.tensor([0, 10, 500, 999])
    a = sched.alphas_cumprod[t]
    torch.testing.assert_close(losses.min_snr_weights(schedule, t, 5.0), expected(a / (1 - a)))
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert losses.snr_weighted_mean(per_sample, schedule, t, None) == per_sample.mean()
    torch.testing.assert_close(losses.snr_weighted_mean(per_sample, schedule, t, 5.0),
                               (per_sample * expected(a / (1 - a))).mean())


def test_offset_noise_shifts_each_channel_by_one_constant():
    plain = losses.sample_noise(torch.Size([2, 4, 8, 8]), torch.Generator().manual_seed(0))
    offset = losses.sample_noise(torch.Size([2, 4, 8, 8]), torch.Generator().manual_seed(0), offset_noise=0.1)
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)  # constant over each channel's pixels
    assert shift.abs().max() > 0 and shift[..., 0, 0].std() > 0  # differing between channels and samples


def test_timesteps_cover_the_training_range():
    _, schedule = _schedule()
    t = losses.sample_timesteps(10_000, schedule, torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == schedule.num_train_timesteps - 1
