"""Knowledge-distillation losses computed in chunks of positions.

Full-vocabulary logits are the memory hog of distillation: batch 4 x 2048 positions x 49152 vocab is 1.6 GB
per model in fp32, and autograd would keep the student's for backward. Here the student's last hidden states
and head weight enter one autograd node that walks the positions in chunks: for each chunk it builds both
models' logits (upcast to fp32 for the softmax), takes the loss and its gradients with respect to that chunk's
hidden states and the head weight, and drops the logits. Backward just returns the accumulated gradients.
Peak memory is one chunk of logits, and the results equal the unchunked formulas.

Per-token divergences, on temperature-softened distributions p = softmax(z / T):
  kl  = KL(p_teacher || p_student)   (forward KL, Hinton et al.)
  rkl = KL(p_student || p_teacher)   (reverse KL, mode seeking)
  jsd = (KL(p_t || m) + KL(p_s || m)) / 2 with m = (p_t + p_s) / 2
The training loss is  alpha * T^2 * mean(divergence) + (1 - alpha) * mean(cross-entropy on the next token).
With per-position ``weights`` w both means become weighted, sum(w l) / sum(w) (e.g. the answer tokens of
long-range items weighted up, so the few positions only a memory can get right are not lost among the ones it
need not); the reported KD and cross-entropy stay plain means, comparable across runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KD_KINDS = ("kl", "rkl", "jsd")
IGNORE_INDEX = -100


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row divergence between two log-probability tensors over the last dimension."""
    if kind == "kl":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if kind == "rkl":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if kind == "jsd":
        mixture = torch.logsumexp(torch.stack([student_logp, teacher_logp]), dim=0) - math.log(2.0)
        return 0.5 * (divergence(mixture, teacher_logp, "kl") + divergence(mixture, student_logp, "kl"))
    raise ValueError(f"unknown KD loss {kind!r}; choose one of {', '.join(KD_KINDS)}")


@dataclass
class DenseTeacher:
    """The teacher's last hidden states (N, H) and head weight (V, H): its logits are built chunk by chunk."""

    hidden: torch.Tensor
    head_weight: torch.Tensor

    def divergence(
        self, student_logits: torch.Tensor, rows: slice, kind: str, temperature: float
    ) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = (self.hidden[rows] @ self.head_weight.T).float()
        teacher_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
        return divergence(F.log_softmax(student_logits / temperature, dim=-1), teacher_logp, kind)


@dataclass
class TopKTeacher:
    """The teacher's top-k logits per position (values and vocabulary indices, (N, K)) from a teacher cache.

    Only forward KL is defined on a truncated teacher: the teacher distribution is renormalised over its top k
    and compared with the student's full-vocabulary log-probabilities at those k tokens.
    """

    values: torch.Tensor
    indices: torch.Tensor

    def divergence(
        self, student_logits: torch.Tensor, rows: slice, kind: str, temperature: float
    ) -> torch.Tensor:
        if kind != "kl":
            raise ValueError(
                f"--loss {kind} needs the full teacher distribution; a top-k teacher cache supports only "
                "--loss kl"
            )
        teacher_logp = F.log_softmax(self.values[rows].float() / temperature, dim=-1)
        student_logp = F.log_softmax(student_logits / temperature, dim=-1).gather(
            -1, self.indices[rows].long()
        )
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def _chunk_losses(logits, target, teacher, rows, kind, temperature):
    """Per-row KD divergence and cross-entropy of one chunk of rows (fp32 logits; 0 where the label is
    ignored)."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    if teacher is None:
        return torch.zeros_like(ce), ce
    return teacher.divergence(logits, rows, kind, temperature) * (target != IGNORE_INDEX), ce


class _ChunkedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head_weight, labels, teacher, kind, temperature, alpha, chunk_size, weights):
        track = hidden.requires_grad or head_weight.requires_grad
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(head_weight) if head_weight.requires_grad else None
        valid = labels != IGNORE_INDEX
        n_tokens = valid.sum().clamp(min=1)
        if weights is not None:
            weights = weights.float() * valid
            weight_total = weights.sum().clamp(min=torch.finfo(torch.float32).tiny)
        kd_total = hidden.new_zeros((), dtype=torch.float32)
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        loss_total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.enable_grad() if track else torch.no_grad():
                chunk = hidden[rows].detach().requires_grad_(grad_hidden is not None)
                weight = head_weight.detach().requires_grad_(grad_weight is not None)
                kd, ce = _chunk_losses(
                    (chunk @ weight.T).float(), labels[rows], teacher, rows, kind, temperature
                )
                per_row = alpha * temperature**2 * kd + (1.0 - alpha) * ce
                if weights is None:
                    loss = per_row.sum() / n_tokens
                else:
                    loss = (per_row * weights[rows]).sum() / weight_total
                kd, ce = kd.sum(), ce.sum()
            if track:
                wrt = [t for t in (chunk, weight) if t.requires_grad]
                grads = list(torch.autograd.grad(loss, wrt))
                if grad_hidden is not None:
                    grad_hidden[rows] = grads.pop(0)
                if grad_weight is not None:
                    grad_weight += grads.pop(0)
            kd_total += kd.detach()
            ce_total += ce.detach()
            loss_total += loss.detach()
        ctx.has_grad = (grad_hidden is not None, grad_weight is not None)
        ctx.save_for_backward(*[g for g in (grad_hidden, grad_weight) if g is not None])
        kd_mean, ce_mean = kd_total / n_tokens, ce_total / n_tokens
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return loss_total, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        saved = iter(ctx.saved_tensors)
        grad_hidden = next(saved) * grad_loss if ctx.has_grad[0] else None
        grad_weight = next(saved) * grad_loss if ctx.has_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def distillation_loss(
    student_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: DenseTeacher | TopKTeacher | None,
    *,
    kind: str = "kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    chunk_size: int = 256,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean KD divergence, mean cross-entropy) over the positions whose label is not -100.

    `student_hidden` is (N, H) (flatten batch and time first), `labels` (N,) the next-token ids, and the
    teacher's rows line up with the student's. `teacher=None` gives plain cross-entropy (KD term 0).
    `weights` (N,), if given, weight the positions of the loss (not of the reported means).
    """
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(
            f"weights have shape {tuple(weights.shape)}, expected that of labels {tuple(labels.shape)}"
        )
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss {kind!r}; choose one of {', '.join(KD_KINDS)}")
    return _ChunkedDistillation.apply(
        student_hidden,
        head_weight,
        labels,
        teacher,
        kind,
        float(temperature),
        float(alpha),
        int(chunk_size),
        weights,
    )
