"""The PTQ fidelity metric: Frechet distance against closed forms on Gaussians, and `tuneqdm evaluate --metric fid`."""

import json
import math

import torch

from tuneqdm.cli import main
from tuneqdm.eval.fid import feature_distance, frechet_distance, sqrtm_psd


def _random_psd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_diagonal_gaussians_match_the_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    want = float(((mu1 - mu2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum())  # 0.25 + 4 + 4 + 1 + 0
    assert want == 9.25
    assert math.isclose(frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)), want, rel_tol=1e-12)


def test_non_commuting_2x2_covariances_match_the_closed_form():
    # for 2x2 matrices with real non-negative eigenvalues: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), M = S1 S2
    s1, s2 = _random_psd(2, 0), _random_psd(2, 1)
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    m = s1 @ s2
    cross = math.sqrt(float(torch.trace(m)) + 2 * math.sqrt(float(torch.det(m))))
    mu1, mu2 = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5])
    want = float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2)) - 2 * cross
    got = frechet_distance(mu1, s1, mu2, s2)
    assert math.isclose(got, want, rel_tol=1e-10), (got, want)
    assert math.isclose(frechet_distance(mu2, s2, mu1, s1), got, rel_tol=1e-10)  # symmetric
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-10
    r = sqrtm_psd(s1)
    torch.testing.assert_close(r @ r, s1)


def test_sample_estimate_converges_to_the_gaussians_distance():
    g = torch.Generator().manual_seed(0)
    s1, s2 = _random_psd(3, 2), _random_psd(3, 3)
    mu1, mu2 = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    n = 40_000
    a = mu1 + torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    b = mu2 + torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    want = frechet_distance(mu1, s1, mu2, s2)
    assert abs(feature_distance(a, b) - want) < 0.03 * want


def test_evaluate_fid_on_the_toy_model(tmp_path, capsys):
    out = tmp_path / "fid"
    assert main(["evaluate", "--metric", "fid", "--fid_images", "4", "--num_inference_steps", "2",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "fid" and m["num_images"] == 4 and m["world_seed"] == 50_000_000
    assert m["fd"] > 0 and -1 <= m["text_score"] <= 1 and m["encoder"] == "toy-clip"
    assert (out / "grid.png").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--metric", "fid", "--fid_images", "1", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert capsys.readouterr().err == ("tuneqdm: error: --fid_images must be at least 2 (a covariance needs two "
                                       "images), got 1\n")
    assert main(["evaluate", "--out", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err == ("tuneqdm: error: --instance_data_dir is required for --metric dreambooth "
                                       "(the subject's photos)\n")
