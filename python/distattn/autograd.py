"""autograd: distattn as a torch.autograd.Function (imported only when torch is available).

    out = distattn.attention(q, k, v, plan)              # distributed: this rank's rows
    out = distattn.attention(q, k, v, causal=True)       # single rank
    out.sum().backward()                                 # dq, dk, dv through the library

q [B][S][H][D] (or [S][H][D]), k and v [B][S][G][D], float32 / bfloat16 / float16 CPU tensors
(torch tensors go to the library by data pointer and strides, no copy). The forward keeps q, k, v,
out and lse for the backward, as FlashAttention does; lse is returned by AttentionFunction.apply
but carries no gradient.
"""
import torch

from . import core


def _last_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class AttentionFunction(torch.autograd.Function):
    """apply(q, k, v, plan, causal, window, doc_lens, scale) -> (out, lse). With a Plan the mask
    and shapes are the plan's and the other options are ignored."""

    @staticmethod
    def forward(ctx, q, k, v, plan=None, causal=False, window=0, doc_lens=None, scale=None):
        q, k, v = (_last_contiguous(t.detach()) for t in (q, k, v))
        if plan is not None:
            out, lse = plan.forward(q, k, v)
        else:
            out, lse = core.attention_fwd(q, k, v, causal=causal, window=window, doc_lens=doc_lens,
                                          scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.opts = plan, dict(causal=causal, window=window, doc_lens=doc_lens, scale=scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = _last_contiguous(dout.to(out.dtype))
        if ctx.plan is not None:
            dq, dk, dv = ctx.plan.backward(q, k, v, out, dout, lse)
        else:
            dq, dk, dv = core.attention_bwd(q, k, v, out, dout, lse, **ctx.opts)
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, plan=None, *, causal=False, window=0, doc_lens=None, scale=None):
    """Differentiable attention through libdistattn; returns out (see AttentionFunction for lse)."""
    return AttentionFunction.apply(q, k, v, plan, causal, window, doc_lens, scale)[0]


__all__ = ["AttentionFunction", "attention"]
