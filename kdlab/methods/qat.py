"""QAT with KD: a quantization-aware copy of a trained model, distilled from that model in fp32.

Quantization-aware training (Jacob et al. 2018) fine-tunes a model while its forward pass rounds
as the int8 runtime will, so the weights learn to live on the int8 grid; the full-precision model
teaches its quantized copy (Mishra & Marr 2018, "Apprentice"; Kim et al. 2019, QKD). The student
starts from the teacher's weights, so both must be the same model at the same width.

What is simulated is what ONNX Runtime's static QDQ quantization does to the layers that carry
the compute: the weights of every conv and linear layer rounded per output channel, symmetric
int8 (-127..127, scale max|w|/127: unchanged by folding a following BatchNorm into the conv,
which only rescales each output channel), and their inputs rounded per tensor to uint8 over a
range tracked as a moving average of the batch min/max. Gradients pass straight through the
rounding (within the grid's range; outside it, as in PyTorch's fake-quantize kernels, not at all).
The rounding is written out (`fake_quantize`), not taken from `torch.fake_quantize_*`, whose kernels
read the zero point on the host: a step that waits for the device cannot be captured as a CUDA
graph. The values are the same. The int8 model itself is then made by ONNX Runtime from the fine-tuned float weights
(`kdlab compress`), calibrated as post-training quantization is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kdlab.errors import UserError
from kdlab.methods.base import register_method
from kdlab.methods.kd import HintonKD

RANGE_MOMENTUM = 0.01  # weight of each new batch in the input ranges (torch's observers use the same)
QUANTIZED = (nn.Conv2d, nn.Linear)


class _FakeQuantize(torch.autograd.Function):
    """Round to the integer grid (scale, zero point, [lo, hi]) and back, as PyTorch's fake-quantize
    kernels do: q = clamp(round(x * (1 / scale)) + zero, lo, hi), out = (q - zero) * scale. The
    gradient passes straight through where x falls inside the grid's range and is zero outside it."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero: Tensor, lo: int, hi: int) -> Tensor:
        q = torch.round(x * scale.reciprocal()) + zero
        inside = (q >= lo) & (q <= hi)
        ctx.save_for_backward(inside)
        return (q.clamp(lo, hi) - zero) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero: Tensor, lo: int, hi: int) -> Tensor:
    """`x` rounded to the int grid and back (float32 `scale` and `zero` broadcast against `x`)."""
    return _FakeQuantize.apply(x, scale, zero, lo, hi)


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 rounding of a weight (a parametrization)."""

    def forward(self, w: Tensor) -> Tensor:
        scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / 127).clamp(min=1e-8).float()
        scale = scale.view(-1, *([1] * (w.dim() - 1)))
        return fake_quantize(w.float(), scale, torch.zeros_like(scale), -127, 127).to(w.dtype)


class InputFakeQuant(nn.Module):
    """Per-tensor uint8 rounding of a layer's input over a range learnt as a moving average."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():  # no branch on the values: nothing here waits for the device
                lo, hi = x.detach().amin().float(), x.detach().amax().float()
                m = torch.where(self.seen, RANGE_MOMENTUM, 1.0)
                self.lo.copy_(self.lo + m * (lo - self.lo))
                self.hi.copy_(self.hi + m * (hi - self.hi))
                self.seen.fill_(True)
        lo, hi = self.lo.clamp(max=0.0), self.hi.clamp(min=0.0)  # zero is exactly representable
        scale = ((hi - lo) / 255).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, 255)
        return fake_quantize(x.float(), scale, zero, 0, 255).to(x.dtype)


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quant(args[0]), *args[1:])


def make_quant_aware(model: nn.Module) -> nn.Module:
    """Make every conv and linear layer of `model` round as int8 in its forward pass (in place).

    The state dict gains `...parametrizations.weight.original` and `...input_quant.*` entries;
    `strip_quant_aware` turns the model back into a plain float one.
    """
    for module in model.modules():
        if isinstance(module, QUANTIZED) and not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", WeightFakeQuant())
            module.input_quant = InputFakeQuant().to(module.weight.device)
            module._kdlab_qat_hook = module.register_forward_pre_hook(_quantize_input)
    return model


def strip_quant_aware(model: nn.Module) -> nn.Module:
    """Undo `make_quant_aware`: plain float weights (as trained), no input rounding (in place)."""
    for module in model.modules():
        if isinstance(module, QUANTIZED) and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module._kdlab_qat_hook.remove()
            del module._kdlab_qat_hook, module.input_quant
    return model


@register_method
class QuantAwareKD(HintonKD):
    """Equation (2) with the student rounding as int8 and starting from its teacher's weights."""

    name = "qat"
    needs_teacher = True
    paper = "Jacob et al. 2018 (QAT), with KD from the fp32 model as Mishra & Marr 2018 (arXiv:1711.05852)"

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        if teacher is not None:
            try:
                student.load_state_dict(teacher.state_dict())
            except RuntimeError:
                raise UserError("method 'qat' fine-tunes a quantization-aware copy of its teacher: the student "
                                "must be the teacher's model at the teacher's width") from None
        make_quant_aware(student)
