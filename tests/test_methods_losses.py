"""The distillation losses against hand computations in float64 numpy, on tiny tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlab import losses

RNG = np.random.default_rng(0)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) along the last axis."""
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def huber(d: np.ndarray) -> np.ndarray:
    a = np.abs(d)
    return np.where(a < 1, 0.5 * d * d, a - 0.5)


S = RNG.normal(size=(5, 4)) * 2
T_ = RNG.normal(size=(5, 4)) * 2
Y = np.array([0, 3, 1, 1, 2])


def test_kd_loss_is_equation_2() -> None:
    temp, alpha = 3.0, 0.7
    ce = -np.log(softmax(S)[np.arange(5), Y]).mean()
    soft = kl(softmax(T_ / temp), softmax(S / temp)).mean()
    expected = alpha * ce + (1 - alpha) * temp**2 * soft
    got = losses.kd_loss(t(S), t(T_), torch.tensor(Y), temp, alpha)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_dkd_parts_match_their_definitions() -> None:
    temp = 4.0
    p_s, p_t = softmax(S / temp), softmax(T_ / temp)
    rows = np.arange(5)
    b_s = np.stack([p_s[rows, Y], 1 - p_s[rows, Y]], 1)
    b_t = np.stack([p_t[rows, Y], 1 - p_t[rows, Y]], 1)
    keep = np.ones_like(p_s, dtype=bool)
    keep[rows, Y] = False
    nt_s = p_s[keep].reshape(5, 3)
    nt_t = p_t[keep].reshape(5, 3)
    nt_s, nt_t = nt_s / nt_s.sum(1, keepdims=True), nt_t / nt_t.sum(1, keepdims=True)
    tckd, nckd = kl(b_t, b_s), kl(nt_t, nt_s)
    got_t, got_n = losses.dkd_parts(t(S), t(T_), torch.tensor(Y), temp)
    assert float(got_t) == pytest.approx(temp**2 * tckd.mean(), rel=1e-5)
    assert float(got_n) == pytest.approx(temp**2 * nckd.mean(), rel=1e-5)
    # The paper's decomposition: KD = TCKD + (1 - p_t of the target) * NCKD, per example.
    assert kl(p_t, p_s) == pytest.approx(tckd + (1 - p_t[rows, Y]) * nckd, rel=1e-9)
    got = losses.dkd_loss(t(S), t(T_), torch.tensor(Y), temp, alpha=1.0, beta=8.0)
    assert float(got) == pytest.approx(float(got_t) + 8 * float(got_n), rel=1e-6)


def test_attention_map_and_at_loss_with_pooling() -> None:
    fs = RNG.normal(size=(2, 3, 4, 4))
    ft = RNG.normal(size=(2, 5, 2, 2))

    def att(f: np.ndarray, pool: int) -> np.ndarray:
        energy = (np.abs(f) ** 2).mean(1)  # (N, H, W)
        n, h, w = energy.shape
        energy = energy.reshape(n, h // pool, pool, w // pool, pool).mean((2, 4)).reshape(n, -1)
        return energy / np.linalg.norm(energy, axis=1, keepdims=True)

    got_map = losses.attention_map(t(fs))
    assert np.allclose(got_map.numpy(), att(fs, 1), atol=1e-6)
    assert np.allclose(losses.attention_map(t(fs), size=(2, 2)).numpy(), att(fs, 2), atol=1e-6)
    expected = ((att(fs, 2) - att(ft, 1)) ** 2).mean()
    assert float(losses.at_loss(t(fs), t(ft))) == pytest.approx(expected, rel=1e-5)
    assert float(losses.at_loss(t(ft), t(fs))) == pytest.approx(expected, rel=1e-5)


def test_hint_loss_pools_to_the_smaller_map() -> None:
    fs, ft = RNG.normal(size=(2, 3, 2, 2)), RNG.normal(size=(2, 3, 4, 4))
    pooled = ft.reshape(2, 3, 2, 2, 2, 2).mean((3, 5))
    assert float(losses.hint_loss(t(fs), t(ft))) == pytest.approx(((fs - pooled) ** 2).mean(), rel=1e-5)


def _distances(e: np.ndarray) -> np.ndarray:
    return np.sqrt(((e[:, None, :] - e[None, :, :]) ** 2).sum(-1))


def test_rkd_distance_loss() -> None:
    rng = np.random.default_rng(0)  # its own: the shared RNG's state depends on which tests ran before
    es = rng.normal(size=(5, 3))
    et = rng.normal(size=(5, 6))
    et[0] *= 8  # an outlier, so some normalised differences exceed Huber's delta
    n = 5
    off = ~np.eye(n, dtype=bool)
    ds, dt = _distances(es), _distances(et)
    ds, dt = ds / ds[off].mean(), dt / dt[off].mean()
    assert np.abs(ds - dt)[off].max() > 1
    expected = huber(ds - dt)[off].mean()
    assert float(losses.rkd_distance_loss(t(es), t(et))) == pytest.approx(expected, rel=1e-5)
    assert np.allclose(losses.pairwise_distances(t(es)).numpy(), _distances(es), atol=1e-5)


def test_rkd_angle_loss() -> None:
    es, et = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 5))
    n = 4

    def cosines(e: np.ndarray) -> dict[tuple[int, int, int], float]:
        out = {}
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    if i != j and k != j:
                        u, v = e[i] - e[j], e[k] - e[j]
                        out[j, i, k] = u @ v / np.linalg.norm(u) / np.linalg.norm(v)
        return out

    cs, ct = cosines(es), cosines(et)
    expected = np.mean([huber(cs[key] - ct[key]) for key in cs])
    assert float(losses.rkd_angle_loss(t(es), t(et))) == pytest.approx(expected, rel=1e-5)


def test_pairwise_distances_have_finite_gradients_at_duplicates() -> None:
    e = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    losses.rkd_distance_loss(e, torch.randn(3, 4)).backward()
    assert torch.isfinite(e.grad).all()
    e.grad = None
    losses.rkd_angle_loss(e, torch.randn(3, 4)).backward()
    assert torch.isfinite(e.grad).all()


def test_sp_loss() -> None:
    fs, ft = RNG.normal(size=(3, 2, 2, 2)), RNG.normal(size=(3, 4, 1, 1))

    def sim(f: np.ndarray) -> np.ndarray:
        f = f.reshape(len(f), -1)
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    expected = ((sim(ft) - sim(fs)) ** 2).sum() / 9
    assert float(losses.sp_loss(t(fs), t(ft))) == pytest.approx(expected, rel=1e-5)


def test_mutual_kl_averages_over_the_others_and_treats_them_as_targets() -> None:
    zs = [RNG.normal(size=(4, 3)) for _ in range(3)]
    temp = 2.0
    ps = [softmax(z / temp) for z in zs]
    expected = [np.mean([temp**2 * kl(ps[j], ps[i]).mean() for j in range(3) if j != i]) for i in range(3)]
    logits = [t(z).requires_grad_() for z in zs]
    got = losses.mutual_kl(logits, temp)
    assert [float(g.detach()) for g in got] == pytest.approx(expected, rel=1e-5)
    got[0].backward()
    assert logits[1].grad is None and logits[2].grad is None and logits[0].grad is not None


def test_losses_are_float32_from_bfloat16_inputs() -> None:
    s = torch.randn(4, 5).bfloat16()
    f = torch.randn(4, 3, 4, 4).bfloat16()
    y = torch.tensor([0, 1, 2, 3])
    outs = [*losses.dkd_parts(s, s, y, 4.0), losses.at_loss(f, f), losses.sp_loss(f, f), losses.hint_loss(f, f),
            losses.rkd_distance_loss(s, s), losses.rkd_angle_loss(s, s), *losses.mutual_kl([s, s])]
    assert all(o.dtype == torch.float32 for o in outs)
