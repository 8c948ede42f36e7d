"""Hugging Face ``transformers`` causal language models on pgest's fused head:
per-token log-probabilities and entropies of a sequence without the
(tokens, vocab) logits.

The model's decoder runs to its final hidden states; its output embedding's
weight (and bias) then go through :func:`pgest.linear_log_prob`, which never
builds the logits. Only models whose logits are their output embedding
applied to the last hidden state, then soft-capped where the config says so
(Gemma 2's ``final_logit_softcapping``, applied in the head's pass), are
accepted: a model that transforms them otherwise (a logit scale) raises
``NotImplementedError`` rather than giving other numbers, and the first call
for each model class checks the identity on a two-token input.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..linear.head import linear_log_prob
from ..linear.tiles import soft_cap_

_VERIFIED = set()  # model classes whose logits were checked to be head(last hidden state)
# config attributes of transformers models that change the logits after the head
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_logits_scale")


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


def logit_softcap(model) -> float:
    """The model's final logit soft-capping (``final_logit_softcapping`` of
    its text config: Gemma 2), 0.0 for none."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return float(getattr(config, "final_logit_softcapping", None) or 0.0)


def cache_argument(module) -> str:
    """The name of a transformers model's KV-cache argument and output field:
    ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _positions(decoder, mask: Optional[Tensor], first: int = 0, length: Optional[int] = None) -> dict:
    """position_ids counted from each sequence's first real token (what
    transformers' generate() and vLLM use with left padding), for the
    columns [first, first + length) of ``mask``; {} when there is no mask or
    the model takes no position ids."""
    if mask is None or "position_ids" not in inspect.signature(decoder.forward).parameters:
        return {}
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return {"position_ids": pos[:, first:] if length is None else pos[:, first:first + length]}


def _fsdp2(model) -> bool:
    """Whether ``model`` is sharded by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def _through_model(model, decoder, head, on_head=None, **kwargs):
    """The model's own forward, with the decoder's output and the head's
    input and output captured on the way: (model output, decoder output,
    head input, head output, on_head(head input, head) or None). on_head
    runs inside the forward, where FSDP2 has the head's parameters gathered."""
    seen = {}

    def head_hook(m, a, out):
        seen.update(x=a[0], y=out, z=None if on_head is None else on_head(a[0], m))

    hooks = [decoder.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out)),
             head.register_forward_hook(head_hook)]
    try:
        out = model(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return out, seen["h"], seen["x"], seen["y"], seen["z"]


def as_head_forward(head, fn, x: Tensor):
    """fn(x, weight, bias) run as the head module's own forward: the hooks
    that wrap the head's forward wrap pgest's computation instead. DeepSpeed
    ZeRO-3 gathers the head's partitioned parameters in them, and again before
    the backward of what the forward returned (its hooks wrap the outputs);
    outside them the parameters are empty placeholders."""
    own = head.__dict__.get("forward")
    head.forward = lambda t: fn(t, head.weight, head.bias)
    try:
        return head(x)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _last_hidden(model, decoder, head, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """The decoder's final hidden states. Under FSDP2 through the model's own
    forward, with the head's logits for one position only: the root
    module's forward is what gathers the parameters it owns (embeddings,
    final norm, head; kept gathered for the backward) and arranges their
    gradients' reduce-scatter, where the decoder alone would meet them
    sharded."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                  **_positions(decoder, attention_mask))
    if not _fsdp2(model):
        return decoder(**kwargs).last_hidden_state
    return _through_model(model, decoder, head, logits_to_keep=1, **kwargs)[1].last_hidden_state


def _decode_step(model, decoder, head, sample, **kwargs):
    """(decoder output, sample(last position's hidden state, weight, bias))
    of one decode step; under FSDP2 the sampler runs inside the model's
    forward (on the head's input, with the head's gathered parameters)."""
    if not _fsdp2(model):
        out = decoder(**kwargs)
        return out, as_head_forward(head, sample, out.last_hidden_state[:, -1])
    run = lambda x, m: sample(x[:, -1], m.weight, m.bias)  # noqa: E731
    _, out, _, _, s = _through_model(model, decoder, head, run, logits_to_keep=1, **kwargs)
    return out, s


def _verify(model, decoder, head, input_ids: Tensor) -> None:
    """Once per model class: the model's logits on two tokens are its head
    applied to the decoder's last hidden state (one forward, both seen on
    the way)."""
    cls = type(model)
    if cls in _VERIFIED:
        return
    ids = input_ids[:1, :2]
    training = model.training
    try:
        model.eval()  # no dropout
        with torch.no_grad():
            out, dec, x, y, _ = _through_model(model, decoder, head, input_ids=ids, use_cache=False)
            h = dec.last_hidden_state
    finally:
        model.train(training)
    tol = 1e-4 if y.dtype in (torch.float32, torch.float64) else 2e-2
    same = lambda a, b: a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)  # noqa: E731
    y = soft_cap_(y.clone(), logit_softcap(model))  # the head's own step, in its order
    if not (same(x, h) and same(out.logits, y)):
        raise NotImplementedError(f"{cls.__name__}'s logits are not its output embedding applied to its last hidden "
                                  "state (a transform pgest's fused head does not reproduce): use the model's logits")
    _VERIFIED.add(cls)


def token_log_probs(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                    logits_to_keep: Optional[int] = None, temperature=1.0, top_k=None, top_p=None, min_p=None,
                    threshold: Optional[Tensor] = None) -> TokenLogProbs:
    """Per-token log-probabilities and entropies of ``input_ids`` under a
    ``transformers`` causal LM, without the logits.

    Args:
        model: a causal LM (``AutoModelForCausalLM``: Llama, Qwen2, Mistral,
            GPT-2 and the like), in training or eval mode.
        input_ids: (batch, seq_len) token ids.
        attention_mask: (batch, seq_len), 1 for tokens and 0 for padding
            (left padding included), passed to the model; positions are then
            counted from each sequence's first token, as transformers'
            ``generate()`` and vLLM count them (and as :func:`generate` does).
        logits_to_keep: score only the last ``logits_to_keep`` tokens (a
            prompt's tokens are not scored), as TRL's
            ``_get_per_token_logps_and_entropies`` does.
        temperature: the logits are divided by it (a number, or one per
            scored position).
        top_k, top_p, min_p, threshold: score under the truncated,
            renormalised distribution :func:`generate` samples with the same
            parameters (or its recorded ``truncation.cut``), as
            :func:`pgest.linear_log_prob` does.

    Returns:
        ``TokenLogProbs(log_prob, entropy)``, each (batch, seq_len - 1), or
        (batch, logits_to_keep): position t scores ``input_ids[:, t + 1]``
        (the next token). float32 (float64 for a float64 model);
        differentiable into every parameter of the model. A position whose
        next token is padding (``attention_mask`` 0) gets log_prob 0 and
        entropy 0, and no gradient.
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
    hidden = _last_hidden(model, decoder, head, input_ids, attention_mask)
    keep = L - 1 if logits_to_keep is None else logits_to_keep
    h = hidden[:, L - 1 - keep:L - 1]
    labels = input_ids[:, L - keep:]
    if attention_mask is not None:  # a padding token is not scored (nor checked against a kept set)
        labels = torch.where(attention_mask[:, L - keep:] == 0, torch.full_like(labels, -100), labels)
    softcap = logit_softcap(model)

    def score(x, weight, bias):  # a plain tuple: hooks rebuild what a forward returns by its type
        return tuple(linear_log_prob(x, weight, labels, bias=bias, temperature=temperature, ignore_index=-100,
                                     softcap=softcap, top_k=top_k, top_p=top_p, min_p=min_p, threshold=threshold))

    lp, ent = as_head_forward(head, score, h)
    return TokenLogProbs(lp, ent)


class Generation(NamedTuple):
    completion_ids: Tensor   # (batch, new tokens) int64; after a sequence's end-of-sequence token: pad_token_id
    completion_mask: Tensor  # (batch, new tokens) int64, 1 up to and including the end-of-sequence token
    log_probs: Tensor        # (batch, new tokens): the sampler's log-probabilities (0 where masked)
    entropy: Tensor          # (batch, new tokens): the entropy of each step's distribution (0 where masked)
    truncation: Optional[object]  # pgest.Truncation of (batch, new tokens) when a filter was given, else None


def decode_filters(batch: int, head, temperature, top_k, top_p, min_p) -> dict:
    """linear_sample's arguments for one decode step of ``batch`` sequences:
    the given filters, and, when the step's logits fit the head's workspace,
    the blocked route (top_k=0: no filter, one product and one native pass),
    which beats the tiled one's many small operations at decode shapes
    (bench/bench_decode.py). The head's sizes from the nn.Linear itself (a
    partitioned weight is empty outside a forward)."""
    from ..linear.head import tile_sizes

    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    tokens = torch.empty((0, head.in_features), dtype=head.weight.dtype, device=head.weight.device)
    tn, tv = tile_sizes(tokens, None, None)  # the device's tiles
    if all(v is None for v in (top_k, top_p, min_p)) and batch * head.out_features <= tn * tv:
        filters["top_k"] = 0
    return filters


def _as_id_set(eos_token_id) -> Optional[Tensor]:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool) else eos_token_id
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                 for i in ids):
        raise TypeError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.int64)


def generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int,
             temperature: float = 1.0, top_k=None, top_p=None, min_p=None, eos_token_id=None,
             pad_token_id: int = 0, generator: Optional[torch.Generator] = None) -> Generation:
    """Token-by-token sampling from a ``transformers`` causal LM with its KV
    cache and pgest's fused sampler (:func:`pgest.linear_sample`): no
    (batch, vocab) logits per step. No gradient.

    Args:
        model, input_ids, attention_mask: as for :func:`token_log_probs`
            (left-padded prompts; positions count from each sequence's first
            token, as in :func:`token_log_probs`, which on prompt + completion
            then scores the same distributions).
        max_new_tokens: the number of steps.
        temperature, top_k, top_p, min_p: the sampling distribution
            (:func:`pgest.truncation`; temperature 0 is greedy).
        eos_token_id: an id or a list of ids that end a sequence (kept in the
            completion, masked 1); a finished sequence is padded with
            ``pad_token_id`` and masked 0 afterwards. None: every sequence runs
            ``max_new_tokens`` steps.
        generator: a torch.Generator of the model's device.

    Returns:
        ``Generation(completion_ids, completion_mask, log_probs, entropy,
        truncation)``, each (batch, new tokens); scored again with
        :func:`token_log_probs` on ``cat([input_ids, completion_ids], 1)``,
        the log-probabilities equal the sampler's to float rounding (bit for
        bit where the model's hidden states agree between the cached and the
        full forward).
    """
    decoder, head = decoder_and_head(model)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError("input_ids must be a (batch, prompt_len) tensor with at least one token per sequence")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    from ..linear.head import linear_sample

    _verify(model, decoder, head, input_ids)
    eos = _as_id_set(eos_token_id)
    B, dev = input_ids.shape[0], input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    filters = decode_filters(B, head, temperature, top_k, top_p, min_p)
    softcap = logit_softcap(model)
    ids, lps, ents, records = [], [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    alive = []
    cache_name = cache_argument(decoder)
    past = None
    step_ids = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out, s = _decode_step(model, decoder, head,
                                  lambda h, w, b: linear_sample(h, w, bias=b, generator=generator,
                                                                softcap=softcap, **filters),
                                  input_ids=step_ids, attention_mask=mask, use_cache=True, **{cache_name: past},
                                  **_positions(decoder, mask, mask.shape[1] - step_ids.shape[1]))
            past = getattr(out, cache_name)
            tok = torch.where(done, torch.full_like(s.actions, pad_token_id), s.actions)
            alive.append(~done)
            ids.append(tok)
            lps.append(torch.where(done, torch.zeros_like(s.log_prob), s.log_prob))
            ents.append(torch.where(done, torch.zeros_like(s.entropy), s.entropy))
            if len(s) == 4:
                records.append(s[3])
            if eos is not None:
                done = done | torch.isin(tok, eos.to(dev))
            step_ids = tok[:, None]
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], 1)
            if bool(done.all()):
                break
    truncation = None
    if records:
        truncation = type(records[0])(*(torch.stack(f, 1) for f in zip(*records)))
    return Generation(torch.stack(ids, 1), torch.stack(alive, 1).to(torch.int64), torch.stack(lps, 1),
                      torch.stack(ents, 1), truncation)
