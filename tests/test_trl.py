"""pgest.integrations.trl: TRL's fused-head contract on pgest's head, against
the model's own logits in float64, against TRL's head, and TRL's GRPOTrainer
run end to end on it (tiny models built from configs; nothing downloaded)."""
import tempfile
import warnings

import pytest
import torch

tf = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
from trl.trainer.utils import add_fused_lm_head as trl_fused_head  # noqa: E402

from pgest.integrations import trl as ptrl  # noqa: E402

V = 302
PAD, EOS = 300, 301


def _model(tied=False, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = tf.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         pad_token_id=PAD, eos_token_id=EOS)
    return tf.AutoModelForCausalLM.from_config(cfg).to(dtype)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # the prompt is not scored, as GRPOTrainer labels it
    return ids, mask, labels


@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_equals_the_models_logits_in_float64(tied):
    T = 0.7
    model = _model(tied)
    ref_model = _model(tied)
    ptrl.add_fused_lm_head(model, temperature=T, outputs=("log_probs", "entropy"))
    assert model.forward.__func__.pgest_head
    ids, mask, labels = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, num_items_in_batch=7)
    logits = ref_model(input_ids=ids, attention_mask=mask).logits[:, :-1] / T
    ls = torch.log_softmax(logits, -1)
    target = labels[:, 1:]
    keep = target != -100
    want_lp = torch.where(keep, ls.gather(-1, target.clamp(min=0)[..., None])[..., 0], 0.0)
    want_ent = torch.where(keep, -(ls.exp() * ls).sum(-1), 0.0)
    assert out.log_probs.dtype == torch.float64 and out.log_probs.shape == target.shape
    torch.testing.assert_close(out.log_probs, want_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.entropy, want_ent, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.label_mask, keep)
    torch.testing.assert_close(out.loss, -want_lp.sum() / 7, rtol=1e-12, atol=1e-12)
    (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
    (want_lp.sum() + 0.3 * want_ent.sum()).backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)
    # pre-shifted labels (context parallelism) are scored as given
    shifted = model(input_ids=ids, attention_mask=mask, shift_labels=torch.cat([target, target[:, :1]], 1),
                    fused_lm_head=True)
    torch.testing.assert_close(shifted.log_probs[:, :-1], out.log_probs.detach(), rtol=0, atol=0)
    # without fused_lm_head the model is its old self: logits, and generation
    plain = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(plain.logits, ref_model(input_ids=ids, attention_mask=mask).logits)
    gen = model.generate(ids[1:2], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 14)


def test_fused_head_agrees_with_trls_own():
    # TRL's head computes in float32: the same numbers to float32 rounding
    model, theirs = _model(dtype=torch.float32), _model(dtype=torch.float32)
    ptrl.add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
    trl_fused_head(theirs, temperature=0.9, outputs=("log_probs", "entropy"))
    ids, mask, labels = _batch(2)
    a = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    b = theirs(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    for f in ("log_probs", "entropy", "loss"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=2e-5, atol=2e-5, msg=f)
    assert torch.equal(a.label_mask, b.label_mask)
    only_lp = _model(dtype=torch.float32)
    ptrl.add_fused_lm_head(only_lp)
    assert only_lp(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).entropy is None


def test_gemma2_soft_capping_as_trls_head_applies_it():
    torch.manual_seed(0)
    cfg = tf.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.1)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    theirs = tf.AutoModelForCausalLM.from_config(cfg)
    theirs.load_state_dict(model.state_dict())
    ptrl.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    trl_fused_head(theirs, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = -100
    a = model(input_ids=ids, labels=labels, fused_lm_head=True)
    b = theirs(input_ids=ids, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=2e-5, atol=2e-5)


def test_cast_lm_head_to_fp32_scores_a_bf16_model_in_float32():
    model = _model(dtype=torch.bfloat16)
    ptrl.add_fused_lm_head(model, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    ids, mask, labels = _batch(4)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert out.log_probs.dtype == torch.float32
    # against float64 arithmetic on the same bf16 hidden states and weight: float32 rounding
    decoder, head = ptrl.decoder_and_head(model)
    with torch.no_grad():
        h = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1].double()
        ls = (h @ head.weight.double().T).log_softmax(-1)
    t = labels[:, 1:]
    want = torch.where(t != -100, ls.gather(-1, t.clamp(min=0)[..., None])[..., 0], 0.0)
    torch.testing.assert_close(out.log_probs.double(), want, rtol=0, atol=1e-5)
    out.loss.backward()
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.bfloat16


def test_fused_head_errors():
    model = _model()
    with pytest.raises(NotImplementedError, match="is_top1"):
        ptrl.add_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        ptrl.add_fused_lm_head(model, temperature=0.0)
    cohere = tf.AutoModelForCausalLM.from_config(tf.CohereConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, logit_scale=0.5))
    with pytest.raises(NotImplementedError, match="logit_scale"):
        ptrl.add_fused_lm_head(cohere)
    ptrl.add_fused_lm_head(model)
    ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids=ids, attention_mask=mask, fused_lm_head=True)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(300)}
    vocab.update({"<pad>": PAD, "<eos>": EOS})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _logits_head(model, temperature=1.0, outputs=("log_probs",), **unused):
    """The fused-head contract by materialised logits in the model's dtype:
    the test's float64 reference for the trainer."""
    from trl.trainer.utils import FusedCausalLMOutput

    cls_forward = type(model).forward

    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return cls_forward(self, *args, **kwargs)
        kwargs["use_cache"] = False
        ls = torch.log_softmax(cls_forward(self, *args, **kwargs).logits[:, :-1] / temperature, -1)
        target = labels[:, 1:]
        keep = target != -100
        lp = torch.where(keep, ls.gather(-1, target.clamp(min=0)[..., None])[..., 0], 0.0)
        ent = torch.where(keep, -(ls.exp() * ls).sum(-1), 0.0)
        return FusedCausalLMOutput(loss=-lp.sum() / keep.sum().clamp(min=1), log_probs=lp,
                                   entropy=ent if "entropy" in outputs else None, label_mask=keep)

    import types

    model.forward = types.MethodType(forward, model)


class _LogitsTrainer(trl.GRPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _logits_head(self.model, self.temperature, ("log_probs", "entropy"))
        _logits_head(self.ref_model, self.temperature)


def test_grpo_trainer_runs_on_pgests_head_and_trains_as_trls():
    # three steps of pgest's GRPOTrainer (TRL's, on pgest's head), of TRL's own,
    # and of TRL's on materialised float64 logits; same seed, float64 model,
    # SGD, a reference model (beta) and two iterations per generation (old
    # log-probs, the clipped ratio): the same completions and rewards; losses,
    # KL, entropies, gradient norms and weights equal to the float64 logits
    # run's, and to TRL's head's within its float32 rounding (its kernel
    # computes in float32, and a GRPO loss of zero-mean advantages cancels)
    from datasets import Dataset

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as path:
        _model(dtype=torch.float32).save_pretrained(path)
        data = Dataset.from_dict({"prompt": [" ".join(f"w{(7 * i + j) % 300}" for j in range(5 + i % 3))
                                             for i in range(16)]})

        def reward(completions, **kw):
            return [len(c) / 10 for c in completions]

        runs = []
        for cls in (_LogitsTrainer, ptrl.GRPOTrainer, trl.GRPOTrainer):
            with tempfile.TemporaryDirectory() as out:
                args = trl.GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=4,
                                      max_completion_length=6, max_steps=3, learning_rate=1e-2, optim="sgd",
                                      use_cpu=True, report_to=[], logging_steps=1, seed=0, beta=0.1,
                                      save_strategy="no", temperature=0.8, num_iterations=2,
                                      model_init_kwargs={"dtype": torch.float64})
                t = cls(model=path, reward_funcs=reward, args=args, train_dataset=data, processing_class=_tokenizer())
                ours = cls is ptrl.GRPOTrainer
                assert getattr(t.model.forward.__func__, "pgest_head", False) == ours
                assert getattr(t.ref_model.forward.__func__, "pgest_head", False) == ours
                t.train()
                runs.append(([h for h in t.state.log_history if "loss" in h], t.model))
    (exact, m0), (mine, m1), (theirs, m2) = runs
    assert len(exact) == len(mine) == len(theirs) == 3
    for a, b, c in zip(exact, mine, theirs):
        assert a.get("reward") == b.get("reward") == c.get("reward")
        for k in ("loss", "kl", "entropy", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-9 + 1e-9 * abs(a[k]), (k, a[k], b[k])
            assert abs(a[k] - c[k]) <= 1e-4 + 1e-2 * abs(a[k]), (k, a[k], c[k])
    assert max((p - q).abs().max().item() for p, q in zip(m0.parameters(), m1.parameters())) < 1e-10
    assert max((p - q).abs().max().item() for p, q in zip(m0.parameters(), m2.parameters())) < 1e-4
