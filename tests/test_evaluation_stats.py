"""The statistics behind evaluation figures: FD, KID, precision/recall, and the intervals on them."""

from __future__ import annotations

import math

import pytest
import torch

from dalle_framework.metrics import (
    bootstrap_interval,
    feature_statistics,
    frechet_distance,
    frechet_distance_of,
    kernel_inception_distance,
    neighbourhood_scores,
    normal_quantile,
    wilson_interval,
)


def correlated(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / math.sqrt(d)
    return torch.randn(n, d, generator=generator) @ mixing + shift


def test_frechet_distance_of_a_split_against_itself_is_zero_and_grows_with_a_shift():
    from dalle_data import ShapesSource

    source = ShapesSource(ShapesSource.Params(image_size=32, samples_per_caption=1, heldout_samples_per_caption=20))
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in source.samples("heldout")]).float() / 255
    real = source.judge_features(images)
    assert real.shape == (len(images), 70) and real.std() > 0.01
    assert abs(frechet_distance_of(real, real)) < 1e-6
    assert frechet_distance_of(real, real + 0.5) == pytest.approx(0.25 * real.shape[1], rel=1e-6), "a mean shift adds |d|^2"
    # two halves of one Gaussian are close; another Gaussian is far
    a, b = correlated(4000, 32, seed=1), correlated(4000, 32, seed=2)
    assert frechet_distance_of(a, b) < 0.05 * frechet_distance_of(a, correlated(4000, 32, seed=3, shift=1.0))


def test_frechet_distance_equals_the_reference_implementations():
    """pytorch-fid (scipy's sqrtm) and torch-fidelity (eigenvalues of S1 S2) give the same number, to 1e-3."""
    np = pytest.importorskip("numpy")
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    metric_fid = pytest.importorskip("torch_fidelity.metric_fid")
    a, b = correlated(1000, 128, seed=4), correlated(1000, 128, seed=5, shift=0.2)
    (mu_a, s_a), (mu_b, s_b) = feature_statistics(a), feature_statistics(b)
    ours = frechet_distance(mu_a, s_a, mu_b, s_b)
    reference = fid_score.calculate_frechet_distance(mu_a.numpy(), s_a.numpy(), mu_b.numpy(), s_b.numpy())
    fidelity = metric_fid.fid_statistics_to_metric({"mu": mu_a.numpy(), "sigma": s_a.numpy()}, {"mu": mu_b.numpy(), "sigma": s_b.numpy()}, False)
    assert ours == pytest.approx(reference, abs=1e-3) and ours == pytest.approx(fidelity["frechet_inception_distance"], abs=1e-3)
    assert np.allclose(s_a.numpy(), np.cov(a.double().numpy(), rowvar=False)), "the covariance is the unbiased one, as the references use"


def test_kid_is_unbiased_on_two_draws_of_one_distribution():
    """Averaged over many pairs of samples from one distribution, KID is 0 within its error; a biased estimator is not."""
    values = []
    for trial in range(60):
        a, b = correlated(60, 8, seed=2 * trial), correlated(60, 8, seed=2 * trial + 1)
        values.append(kernel_inception_distance(a, b, subsets=1, subset_size=60)["kid"])
    values_t = torch.tensor(values)
    stderr = float(values_t.std() / math.sqrt(len(values_t)))
    assert abs(float(values_t.mean())) < 3 * stderr, (float(values_t.mean()), stderr)
    assert (values_t < 0).any(), "an unbiased estimate of 0 goes negative about half the time"
    # a shifted distribution is detected far beyond that noise
    far = kernel_inception_distance(correlated(500, 8, seed=1), correlated(500, 8, seed=2, shift=0.5), subsets=20, subset_size=200)
    assert far["kid"] > 20 * stderr and far["std"] > 0 and far["stderr"] == pytest.approx(far["std"] / math.sqrt(20))
    assert far["subset_size"] == 200


def test_precision_recall_density_coverage_on_same_and_disjoint_distributions():
    real, same = correlated(800, 6, seed=1), correlated(800, 6, seed=2)
    scores = {key: float(value.mean()) for key, value in neighbourhood_scores(real, same, k=5).items()}
    assert scores["precision"] > 0.8 and scores["recall"] > 0.8 and scores["coverage"] > 0.8
    assert 0.8 < scores["density"] < 1.2, "density is about 1 when the two sets are alike"
    apart = {key: float(value.mean()) for key, value in neighbourhood_scores(real, same + 100, k=5).items()}
    assert apart == {"precision": 0.0, "density": 0.0, "recall": 0.0, "coverage": 0.0}
    # half the generated mass off the data: precision halves, recall stays
    mixed = torch.cat([same[:400], same[400:] + 100])
    half = {key: float(value.mean()) for key, value in neighbourhood_scores(real, mixed, k=5).items()}
    assert half["precision"] == pytest.approx(scores["precision"] / 2, abs=0.1) and half["recall"] > 0.5


def test_wilson_intervals_cover_the_true_rate_in_a_simulation():
    """95% Wilson intervals around 2,000 simulated shares of 40 judgements cover the true rate about 95% of the time."""
    generator = torch.Generator().manual_seed(0)
    for rate in (0.5, 0.85, 0.97):
        successes = torch.binomial(torch.full((2000,), 40.0), torch.full((2000,), rate), generator=generator)
        covered = sum(low <= rate <= high for low, high in (wilson_interval(int(k), 40) for k in successes))
        assert 0.93 <= covered / 2000 <= 0.985, (rate, covered / 2000)
    low, high = wilson_interval(40, 40)
    assert high == 1.0 and 0.90 < low < 0.92, "40 of 40 is not a certainty: at 95% the rate may be as low as 91%"
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert normal_quantile(0.95) == pytest.approx(1.959964, abs=1e-6)


def test_bootstrap_intervals_cover_a_mean_in_a_simulation_and_are_deterministic():
    generator = torch.Generator().manual_seed(1)
    covered = 0
    for trial in range(300):
        sample = torch.randn(50, generator=generator).double() + 3.0
        low, high = bootstrap_interval(lambda i: float(sample[i].mean()), 50, resamples=200, seed=trial)
        covered += low <= 3.0 <= high
    assert 0.88 <= covered / 300 <= 0.98, covered / 300  # the percentile bootstrap runs a little narrow at n=50
    sample = torch.arange(10.0)
    first = bootstrap_interval(lambda i: float(sample[i].mean()), 10, seed=3)
    assert first == bootstrap_interval(lambda i: float(sample[i].mean()), 10, seed=3)
    # recentred: the same spread, moved so that the bootstrap's median is the given centre
    plain = bootstrap_interval(lambda i: float(sample[i].mean()) + 5, 10, seed=3)
    moved = bootstrap_interval(lambda i: float(sample[i].mean()) + 5, 10, seed=3, centre=4.5)
    assert moved[1] - moved[0] == pytest.approx(plain[1] - plain[0]) and moved[0] < 4.5 < moved[1] < plain[0]
    # two resampled sets: each index covers its own set
    pairs = []
    bootstrap_interval(lambda a, b: pairs.append((len(a), len(b), int(a.max()), int(b.max()))) or 0.0, 4, 9, resamples=20)
    assert all(n_a == 4 and n_b == 9 and m_a < 4 and m_b < 9 for n_a, n_b, m_a, m_b in pairs)
