"""kd_loss against a hand computation of the paper's equation (2), and the Figure 4 ablation."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.losses import kd_loss, paper_snippet_loss


def softmax(xs: list[float], t: float) -> list[float]:
    m = max(xs)
    e = [math.exp((x - m) / t) for x in xs]
    return [v / sum(e) for v in e]


def hand_kd(s: list[list[float]], t: list[list[float]], y: list[int], temp: float, alpha: float) -> float:
    """alpha * CE + (1 - alpha) * T^2 * KL(p_t || p_s), averaged over the batch, in plain Python."""
    total = 0.0
    for si, ti, yi in zip(s, t, y, strict=True):
        ce = -math.log(softmax(si, 1.0)[yi])
        ps, pt = softmax(si, temp), softmax(ti, temp)
        kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps, strict=True))
        total += alpha * ce + (1 - alpha) * temp * temp * kl
    return total / len(s)


def test_kd_loss_matches_hand_computation():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
    y = [1, 2]
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temperature=3.0, alpha=0.7)
    assert got.ndim == 0
    assert got.item() == pytest.approx(hand_kd(s, t, y, 3.0, 0.7), rel=1e-6)


def test_kd_loss_known_value():
    # One example, two classes; worked out by hand: CE = log(1 + e^-1) = 0.3132617,
    # p_s(T=2) = softmax([0.5, 0]) = [0.6224593, 0.3775407], p_t(T=2) = [0.5, 0.5],
    # KL = 0.5 ln(0.5/0.6224593) + 0.5 ln(0.5/0.3775407) = 0.0309298, times T^2 = 0.1237192.
    got = kd_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([0]), 2.0, 0.5)
    assert got.item() == pytest.approx(0.5 * 0.3132617 + 0.5 * 0.1237192, abs=1e-6)


def test_alpha_one_is_cross_entropy_and_teacher_equal_student_adds_nothing():
    s = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert kd_loss(s, torch.randn(8, 10), y, 4.0, 1.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert kd_loss(s, s.clone(), y, 4.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_flows_to_student_only():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    kd_loss(s, t.detach(), torch.tensor([0, 1, 2, 3]), 3.0, 0.7).backward()
    assert s.grad is not None and t.grad is None


def test_paper_snippet_is_not_equation_2():
    torch.manual_seed(0)
    s, t, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    s.requires_grad_(True)
    snippet = paper_snippet_loss(s, t, y, 3.0, 0.0)
    (g_snippet,) = torch.autograd.grad(snippet, s)
    (g_eq2,) = torch.autograd.grad(kd_loss(s, t, y, 3.0, 0.0), s)
    # Minimising the snippet moves the student away from the teacher: the gradients point apart.
    assert torch.sum(g_snippet * g_eq2).item() < 0


def test_paper_snippet_method_terms_sum_to_the_snippet_loss():
    from kdlab.configure import build_config
    from kdlab.data.loader import Batch
    from kdlab.methods import METHODS
    from kdlab.models import create_model
    from kdlab.teacher import Teacher

    torch.manual_seed(0)
    cfg = build_config("smoke", "resnet18", overrides={"method": "paper_snippet", "teacher": "t", "width": 0.0625})
    student, teacher = create_model("resnet18", 0.0625), create_model("resnet18", 0.0625)
    method = METHODS["paper_snippet"](cfg, student, teacher)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, terms = method(student, Batch(x, y, torch.arange(4), torch.zeros(4, dtype=torch.long)), Teacher(teacher))
    expected = paper_snippet_loss(logits, teacher.eval()(x), y, cfg.temperature, cfg.alpha)
    assert sum(terms.values()).item() == pytest.approx(expected.item(), rel=1e-5)
