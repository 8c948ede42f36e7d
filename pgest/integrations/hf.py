"""Hugging Face ``transformers`` causal language models on pgest's fused head:
per-token log-probabilities and entropies of a sequence without the
(tokens, vocab) logits.

The model's decoder runs to its final hidden states; its output embedding's
weight (and bias) then go through :func:`pgest.linear_log_prob`, which never
builds the logits. Only models whose logits are exactly their output
embedding applied to the last hidden state are accepted: a model that
transforms them further (Gemma 2's final soft-capping, a logit scale) raises
``NotImplementedError`` rather than giving other numbers, and the first call
for each model class checks the identity on a two-token input.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..linear.head import linear_log_prob

_VERIFIED = set()  # model classes whose logits were checked to be head(last hidden state)
# config attributes of transformers models that change the logits after the head
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


class TokenLogProbs(NamedTuple):
    log_prob: Tensor  # (batch, positions): position t scores input_ids[:, t + 1]
    entropy: Tensor   # (batch, positions)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError('pgest.integrations.hf needs transformers: pip install ".[hf]" from a pgest checkout '
                          "(or pip install transformers)") from e
    return transformers


def decoder_and_head(model):
    """(decoder, output embedding) of a causal LM: the base model that returns
    the final (normalised) hidden states, and its ``nn.Linear`` head."""
    _transformers()
    prefix = getattr(model, "base_model_prefix", None)
    decoder = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or not isinstance(head, torch.nn.Linear):
        raise NotImplementedError(f"{type(model).__name__} is not a causal LM pgest can read: it needs a base model "
                                  f"(model.{prefix}) and an nn.Linear output embedding")
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, 0, 0.0) and not isinstance(value, bool):
            raise NotImplementedError(f"{type(model).__name__} transforms its logits after the head ({name} = "
                                      f"{value}); pgest's fused head does not reproduce that yet")
    return decoder, head


def _verify(model, decoder, head, input_ids: Tensor) -> None:
    """Once per model class: the model's own logits on two tokens equal its
    head applied to the decoder's last hidden state."""
    cls = type(model)
    if cls in _VERIFIED:
        return
    ids = input_ids[:1, :2]
    training = model.training
    try:
        model.eval()  # no dropout: the two forwards must see the same network
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False)
            h = decoder(input_ids=ids, use_cache=False).last_hidden_state
            mine = torch.nn.functional.linear(h, head.weight, head.bias)
    finally:
        model.train(training)
    tol = 1e-4 if mine.dtype in (torch.float32, torch.float64) else 2e-2
    if out.logits.shape != mine.shape or not torch.allclose(out.logits, mine, rtol=tol, atol=tol):
        raise NotImplementedError(f"{cls.__name__}'s logits are not its output embedding applied to its last hidden "
                                  "state (a transform pgest's fused head does not reproduce): use the model's logits")
    _VERIFIED.add(cls)


def token_log_probs(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                    logits_to_keep: Optional[int] = None, temperature: float = 1.0) -> TokenLogProbs:
    """Per-token log-probabilities and entropies of ``input_ids`` under a
    ``transformers`` causal LM, without the logits.

    Args:
        model: a causal LM (``AutoModelForCausalLM``: Llama, Qwen2, Mistral,
            GPT-2 and the like), in training or eval mode.
        input_ids: (batch, seq_len) token ids.
        attention_mask: (batch, seq_len), 1 for tokens and 0 for padding
            (left padding included), passed to the model.
        logits_to_keep: score only the last ``logits_to_keep`` tokens (a
            prompt's tokens are not scored), as TRL's
            ``_get_per_token_logps_and_entropies`` does.
        temperature: the logits are divided by it.

    Returns:
        ``TokenLogProbs(log_prob, entropy)``, each (batch, seq_len - 1), or
        (batch, logits_to_keep): position t scores ``input_ids[:, t + 1]``
        (the next token). float32 (float64 for a float64 model);
        differentiable into every parameter of the model. Padding positions
        are scored like any other; mask them in the loss.
    """
    decoder, head = decoder_and_head(model)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    L = input_ids.shape[1]
    if logits_to_keep is not None and (isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or
                                       not 0 < logits_to_keep < L):
        raise ValueError(f"logits_to_keep must be an int in [1, seq_len - 1 = {L - 1}], got {logits_to_keep!r}")
    if L < 2:
        raise ValueError("input_ids needs at least 2 tokens per sequence: position t scores token t + 1")
    _verify(model, decoder, head, input_ids)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    keep = L - 1 if logits_to_keep is None else logits_to_keep
    h = hidden[:, L - 1 - keep:L - 1]
    labels = input_ids[:, L - keep:]
    lp, ent = linear_log_prob(h, head.weight, labels, bias=head.bias, temperature=temperature, ignore_index=None)
    return TokenLogProbs(lp, ent)
