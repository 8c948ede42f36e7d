"""TRL on pgest's fused head: the same contract as TRL's own fused LM head,
computed by :func:`pgest.linear_log_prob`.

TRL 1.16 scores a policy through ``trl.trainer.utils.add_fused_lm_head``:
it patches the model so that ``model(..., labels=labels, fused_lm_head=True)``
returns a ``FusedCausalLMOutput`` (per-token log-probabilities and entropies,
zero where a label is -100, and the mean negative log-likelihood) without
building the logits, and ``GRPOTrainer`` reads its per-token log-probs that
way. :func:`add_fused_lm_head` here installs the same forward, with the same
arguments and outputs, on pgest's head; :class:`GRPOTrainer` is TRL's
trainer with it installed on the policy and the reference model.

Only TRL's public names are used (the function's contract and its output
class), never its private ones; ``pgest.integrations.trl`` imports TRL on
first use (``pip install ".[trl]"``).
"""
from __future__ import annotations

import functools
import types
from contextlib import nullcontext

import torch

from ..linear.head import linear_log_prob
from .hf import as_head_forward, decoder_and_head, logit_softcap

OUTPUTS = ("log_probs", "entropy")  # the FusedCausalLMOutput fields pgest computes


def _trl():
    try:
        import trl
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError as e:
        raise ImportError('pgest.integrations.trl needs TRL: pip install ".[trl]" from a pgest checkout '
                          "(or pip install trl)") from e
    return trl, FusedCausalLMOutput


def _full(t):
    """A DTensor parameter (FSDP2 sharding the head on its own) gathered,
    differentiably; anything else as it is."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs=("log_probs",)) -> None:
    """Patch ``model`` as TRL's ``add_fused_lm_head`` does, with pgest's head.

    ``model(..., labels=labels, fused_lm_head=True)`` then runs the decoder
    and returns TRL's ``FusedCausalLMOutput``: ``log_probs`` and (when asked
    in ``outputs``) ``entropy`` of each next-token label under
    ``softmax(logits / temperature)``, (batch, seq_len - 1), or (batch,
    seq_len) with ``shift_labels``; zero where the label is -100, with no
    work spent there; ``label_mask``; and ``loss``, the negative
    log-likelihood summed over the labels and divided by
    ``num_items_in_batch`` (their count when not passed). Without
    ``fused_lm_head`` the model's forward is the one it had, so generation is
    unchanged.

    Args:
        model: a ``transformers`` causal LM whose logits are its output
            embedding applied to the last hidden state, soft-capped where its
            config says so (Gemma 2; a logit-scaling model raises
            ``NotImplementedError``).
        temperature: the logits are divided by it.
        cast_lm_head_to_fp32: the head in float32 (hidden states converted),
            as TRL's flag does; the trainer casts the head's weight itself.
        outputs: among ``"log_probs"`` and ``"entropy"`` (TRL's other fields,
            ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1``, raise
            ``NotImplementedError``).
    """
    _, output_cls = _trl()
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise NotImplementedError(f"outputs {unknown} are not computed by pgest's head (it gives {list(OUTPUTS)})")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    decoder_and_head(model)  # refuses a model whose logits the head does not reproduce, now rather than later
    previous = model.forward

    @functools.wraps(type(model).forward)  # generate() checks its model kwargs against this signature
    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                      **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return previous(*args, **kwargs, **extra)
        if kwargs.get("output_router_logits") or getattr(self.config, "output_router_logits", False):
            raise NotImplementedError("pgest's TRL head does not compute the MoE router's load-balancing loss")
        # looked up on each call: FSDP and PEFT replace modules after patching
        decoder, head = decoder_and_head(self)
        kwargs["use_cache"] = False
        hidden = decoder(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            if labels is None:
                raise ValueError("fused_lm_head=True needs labels (or shift_labels): the tokens to score")
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        softcap = logit_softcap(self)

        def score(x, weight, bias):  # as the head's forward: where ZeRO-3 has its parameters gathered
            weight, bias = _full(weight), _full(bias)
            x = x.to(weight.device)
            context = nullcontext()
            if cast_lm_head_to_fp32:  # the head in float32 (the trainer casts its weight; a bare call too)
                x, weight = x.float(), weight.float()
                bias = None if bias is None else bias.float()
                context = torch.autocast(x.device.type, enabled=False)
            if x.dtype != weight.dtype:  # autocast's activations against the head's own dtype
                x = x.to(weight.dtype)
            with context:
                return tuple(linear_log_prob(x, weight, labels.to(weight.device), ignore_index=-100, softcap=softcap,
                                             bias=None if bias is None else bias.to(weight.dtype),
                                             temperature=float(temperature)))

        lp, ent = as_head_forward(head, score, hidden)
        labels = labels.to(lp.device)
        mask = labels != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return output_cls(loss=-lp.sum() / count, log_probs=lp, entropy=ent if "entropy" in outputs else None,
                          label_mask=mask)

    fused_forward.pgest_head = True  # what a test or a user can check the installed forward by
    model.forward = types.MethodType(fused_forward, model)


def _grpo_trainer_class():
    trl, _ = _trl()
    from accelerate.utils import is_peft_model

    class GRPOTrainer(trl.GRPOTrainer):
        """``trl.GRPOTrainer`` whose policy and reference model score tokens
        with pgest's head (:func:`add_fused_lm_head`); every argument, every
        other step and every logged figure are TRL's."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            add_fused_lm_head(self.model.get_base_model() if is_peft_model(self.model) else self.model,
                              temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                              outputs=("log_probs", "entropy"))
            if self.ref_model is not None:
                add_fused_lm_head(self.ref_model, temperature=self.temperature,
                                  cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)

    GRPOTrainer.__module__ = __name__
    return GRPOTrainer


def __getattr__(name):
    # the trainer subclasses TRL's: built when first asked for, so that importing
    # this module (and add_fused_lm_head) costs nothing until then
    if name == "GRPOTrainer":
        cls = _grpo_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
