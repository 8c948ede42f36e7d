"""pgest.integrations.hf on tiny randomly initialised transformers models
(built from configs, no weights downloaded), in float64, against the model's
own logits + log_softmax + gather: values, entropies and every parameter's
gradient."""
import pytest
import torch

tf = pytest.importorskip("transformers")

from pgest.integrations import hf  # noqa: E402

V = 300


def tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if kind == "qwen2-tied":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False))
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                bos_token_id=0, eos_token_id=0))
    if kind == "gemma2":  # a cap that bites at these logits (Gemma 2's own is 30)
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.1))
    if kind == "cohere":  # a logit scale: not reproduced by the head
        return tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=0.5))
    raise ValueError(kind)


def reference(model, ids, mask, keep, temperature):
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)  # generate()'s positions
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1] / temperature
    ls = logits.log_softmax(-1)
    lp = ls.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    if mask is not None:  # a padding token is not scored
        scored = mask[:, 1:] != 0
        lp, ent = torch.where(scored, lp, 0.0), torch.where(scored, ent, 0.0)
    return (lp, ent) if keep is None else (lp[:, -keep:], ent[:, -keep:])


@pytest.mark.parametrize("kind", ["qwen2-tied", "qwen2", "llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("keep", [None, 4])
def test_token_log_probs_match_the_models_logits(kind, keep):
    model = tiny(kind).double().eval()  # GPT-2's dropout would draw other masks in the two forwards
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    if kind != "gemma2":  # transformers' eager Gemma 2 gives a left-padded row NaN logits (every position)
        mask[0, :3] = 0  # left padding
        ids[0, :3] = 0
    T = 0.7
    lp, ent = hf.token_log_probs(model, ids, mask, logits_to_keep=keep, temperature=T)
    w = torch.randn(lp.shape, dtype=torch.float64, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((w * lp).sum() + 0.1 * ent.sum(), params, allow_unused=True)
    rlp, rent = reference(model, ids, mask, keep, T)
    want = torch.autograd.grad((w * rlp).sum() + 0.1 * rent.sum(), params, allow_unused=True)
    torch.testing.assert_close(lp, rlp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, rent, rtol=1e-10, atol=1e-10)
    assert lp.shape == (3, 10 if keep is None else keep)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or (a == 0).all()
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_models_whose_logits_are_transformed_are_refused():
    with pytest.raises(NotImplementedError, match="logit_scale"):
        hf.token_log_probs(tiny("cohere"), torch.randint(0, V, (1, 5)))


def test_gemma2_soft_capping_is_applied():
    # the cap changes the numbers (so the equality above is not by accident), and
    # generation samples through it: the sampler's log-probs are the scorer's
    import warnings

    model = tiny("gemma2").double().eval()
    ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(6))
    lp, _ = hf.token_log_probs(model, ids)
    decoder, head = hf.decoder_and_head(model)
    with torch.no_grad():
        uncapped = head(decoder(input_ids=ids).last_hidden_state[:, :-1]).log_softmax(-1)
    assert (lp - uncapped.gather(-1, ids[:, 1:, None]).squeeze(-1)).abs().max() > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = hf.generate(model, ids, max_new_tokens=4, temperature=0.9, top_p=0.9,
                          generator=torch.Generator().manual_seed(7))
    full = torch.cat([ids, gen.completion_ids], 1)
    lp2, _ = hf.token_log_probs(model, full, logits_to_keep=4, temperature=0.9, threshold=gen.truncation.cut)
    torch.testing.assert_close(lp2, gen.log_probs, rtol=1e-10, atol=1e-10)


def test_bad_arguments():
    model = tiny("llama")
    with pytest.raises(ValueError, match="logits_to_keep must be an int"):
        hf.token_log_probs(model, torch.randint(0, V, (1, 5)), logits_to_keep=5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        hf.token_log_probs(model, torch.randint(0, V, (1, 1)))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        hf.token_log_probs(model, torch.randint(0, V, (5,)))
    with pytest.raises(NotImplementedError, match="not a causal LM"):
        hf.token_log_probs(torch.nn.Linear(3, 3), torch.randint(0, V, (1, 5)))


def test_a_transform_hidden_in_forward_is_caught():
    class Scaled(tf.Qwen2ForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    model = Scaled(tf.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(NotImplementedError, match="not its output embedding applied"):
        hf.token_log_probs(model, torch.randint(0, V, (1, 5)))
    with pytest.raises(NotImplementedError, match="not its output embedding applied"):
        hf.generate(model, torch.randint(0, V, (1, 5)), max_new_tokens=2)


def test_peak_memory_is_a_fraction_of_the_logits_at_a_152k_vocabulary():
    from pgest.examples.memory import peak_allocated_bytes

    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 151936, (2, 257))
    hf.token_log_probs(model, ids)  # the once-per-class check, outside the measurement

    def ours():
        lp, ent = hf.token_log_probs(model, ids)
        (lp.sum() + ent.sum()).backward()

    def materialised():
        lp, ent = reference(model, ids, None, None, 1.0)
        (lp.sum() + ent.sum()).backward()

    mine, theirs = peak_allocated_bytes(ours), peak_allocated_bytes(materialised)
    logits = 2 * 256 * 151936 * 4
    assert mine <= theirs / 4 and mine < logits / 2, (mine, theirs, logits)


# ---- generation through the fused sampler ------------------------------------

@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_generate_then_score_gives_the_samplers_log_probs(kind):
    import warnings

    model = tiny(kind).double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, V, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gen = hf.generate(model, ids, mask, max_new_tokens=7, temperature=0.8, top_p=0.9, top_k=50,
                          eos_token_id=list(range(1, 40)), pad_token_id=0, generator=torch.Generator().manual_seed(3))
    n = gen.completion_ids.shape[1]
    assert gen.completion_ids.shape == gen.completion_mask.shape == gen.log_probs.shape == (4, n)
    for b in range(4):  # 1 up to and including the end-of-sequence token, then padding
        m = gen.completion_mask[b].tolist()
        ends = [i for i, t in enumerate(gen.completion_ids[b].tolist()) if 1 <= t < 40 and m[i]]
        assert m == [1] * (ends[0] + 1) + [0] * (n - ends[0] - 1) if ends else m == [1] * n
        assert (gen.completion_ids[b][torch.tensor(m) == 0] == 0).all()
    full = torch.cat([ids, gen.completion_ids], 1)
    fmask = torch.cat([mask, gen.completion_mask], 1)
    lp, ent = hf.token_log_probs(model, full, fmask, logits_to_keep=n, temperature=0.8, top_p=0.9, top_k=50)
    live = gen.completion_mask.bool()
    torch.testing.assert_close(lp[live], gen.log_probs[live], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent[live], gen.entropy[live], rtol=1e-10, atol=1e-10)
    lp2, _ = hf.token_log_probs(model, full, fmask, logits_to_keep=n, temperature=0.8,
                                threshold=gen.truncation.cut)  # the full forward rounds otherwise than the cached one
    torch.testing.assert_close(lp2[live], gen.log_probs[live], rtol=1e-10, atol=1e-10)


def test_greedy_generation_is_transformers_greedy_search():
    import warnings

    model = tiny("llama").double().eval()
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = hf.generate(model, ids, max_new_tokens=6, temperature=0.0)
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                min_new_tokens=6, pad_token_id=0)
    assert torch.equal(ours.completion_ids, theirs[:, 5:])
    assert (ours.log_probs == 0).all() and ours.truncation is not None


def test_generate_bad_arguments():
    model = tiny("llama")
    ids = torch.randint(0, V, (1, 3))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        hf.generate(model, ids, max_new_tokens=0)
    with pytest.raises(TypeError, match="eos_token_id must be an int"):
        hf.generate(model, ids, max_new_tokens=2, eos_token_id="</s>")
    with pytest.raises(ValueError, match="top_p must be in"):
        hf.generate(model, ids, max_new_tokens=2, top_p=1.5)


def test_bf16_model_keeps_float32_logits():
    # a bf16 model: pgest's head keeps the products' float32 results, so its log-probs are
    # closer to float64 arithmetic on the same bf16 hidden states and weights than the
    # model's own bf16-rounded logits are
    model = tiny("qwen2").to(torch.bfloat16).eval()
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(5))
    lp, _ = hf.token_log_probs(model, ids)
    decoder, head = hf.decoder_and_head(model)
    with torch.no_grad():
        h = decoder(input_ids=ids).last_hidden_state[:, :-1].double()
        exact = (h @ head.weight.double().T).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        theirs = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ours_err = (lp.double() - exact).abs().max()
    assert lp.dtype == torch.float32 and ours_err < 1e-4
    assert ours_err <= (theirs.double() - exact).abs().max()


def _fsdp2_worker(rank: int, world: int, port: int, out_dir: str, kind: str) -> None:
    import copy
    import datetime
    import traceback

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = tiny(kind).double()
        plain = copy.deepcopy(model)
        data = [torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, :3] = 0  # left padding
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt, popt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(plain.parameters(), lr=0.1)
        for _ in range(2):
            # rollouts through the fused sampler: one process's tokens and log-probs
            kw = dict(max_new_tokens=4, top_p=0.9)
            got = hf.generate(model, data[rank], mask, generator=torch.Generator().manual_seed(3), **kw)
            ref = hf.generate(plain, data[rank], mask, generator=torch.Generator().manual_seed(3), **kw)
            assert torch.equal(got.completion_ids, ref.completion_ids) and torch.equal(got.log_probs, ref.log_probs)
            got = hf.token_log_probs(model, data[rank], mask)
            (got.log_prob.mean() + 0.3 * got.entropy.mean()).backward()
            opt.step()
            opt.zero_grad()
            # one process: the ranks' losses averaged, as FSDP averages the gradients
            loss = 0
            for r in range(world):
                ref = hf.token_log_probs(plain, data[r], mask)
                loss = loss + (ref.log_prob.mean() + 0.3 * ref.entropy.mean()) / world
                if r == rank:
                    assert torch.equal(got.log_prob, ref.log_prob) and torch.equal(got.entropy, ref.entropy)
            loss.backward()
            popt.step()
            popt.zero_grad()
            for (name, p), q in zip(model.named_parameters(), plain.parameters()):
                torch.testing.assert_close(p.full_tensor(), q, rtol=1e-12, atol=1e-12, msg=name)
        dist.barrier()  # no rank tears gloo down while another still talks to it
        _report(out_dir, rank, None)
    except BaseException:
        _report(out_dir, rank, traceback.format_exc())
    finally:
        _leave()


def _report(out_dir: str, rank: int, error) -> None:
    """A rank's outcome, as a file the spawning test reads."""
    import os

    with open(os.path.join(out_dir, f"ok{rank}" if error is None else f"err{rank}"), "w") as f:
        f.write("ok" if error is None else error)


def _leave() -> None:
    """Tear the group down and leave without the interpreter's teardown, as
    tests/test_vocab_parallel.py's ranks do: a gloo thread still joinable at
    static destruction aborted a rank ("terminate called without an active
    exception") after both had reported ok."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-tied"])
def test_fsdp2_sharded_model_gives_one_process_numbers_and_updates(kind, tmp_path):
    # fully_shard on each layer and the root, 2 gloo ranks with their own data:
    # rollouts, log-probs and entropies equal one process's, and after each SGD
    # step every parameter equals one process's trained on the ranks' mean loss
    # (float64)
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_fsdp2_worker, args=(2, port, str(tmp_path), kind), nprocs=2, start_method="spawn",
                       join=True)
    errors = [p.read_text() for p in sorted(tmp_path.glob("err*"))]
    assert not errors, "\n".join(errors)
    assert sorted(p.name for p in tmp_path.glob("ok*")) == ["ok0", "ok1"]


def _zero3_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    try:
        # torch's dynamo polyfills must load before DeepSpeed's zero.Init patches
        # torch.Tensor.__new__ (deepspeed 0.19.8 against torch 2.13): imported first
        import deepspeed
        import torch._dynamo  # noqa: F401
        import transformers.masking_utils  # noqa: F401

        deepspeed.init_distributed(dist_backend="gloo")
        ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True}
        data = [torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(r)) for r in range(world)]
        for tied in (False, True):
            cfg = tf.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
            torch.manual_seed(0)
            plain = tf.Qwen2ForCausalLM(cfg)
            state = {k: v.clone() for k, v in plain.state_dict().items()}

            def trained(route):
                with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
                    model = tf.Qwen2ForCausalLM(cfg)
                with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                    if rank == 0:
                        model.load_state_dict(state)
                engine, _, _, _ = deepspeed.initialize(model=model, config=ds_cfg,
                                                       optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
                assert engine.module.lm_head.weight.numel() == 0  # partitioned outside a forward
                if route == "pgest":
                    lp, ent = hf.token_log_probs(engine.module, data[rank], temperature=0.8)
                    gen = hf.generate(engine.module, data[rank][:, :4], max_new_tokens=3, temperature=0.8,
                                      generator=torch.Generator().manual_seed(5))
                else:
                    ls = (engine(input_ids=data[rank]).logits[:, :-1] / 0.8).log_softmax(-1)
                    lp, ent, gen = ls.gather(-1, data[rank][:, 1:, None]).squeeze(-1), -(ls.exp() * ls).sum(-1), None
                engine.backward(lp.mean() + 0.3 * ent.mean())
                engine.step()
                with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                    return [p.detach().clone() for p in engine.module.parameters()], lp.detach(), gen

            ours, lp, gen = trained("pgest")
            theirs, lp_ref, _ = trained("logits")
            want = hf.token_log_probs(plain, data[rank], temperature=0.8).log_prob
            assert torch.equal(lp, want), (lp - want).abs().max()  # the plain model's numbers, bit for bit
            torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=2e-6)
            for a, b, p in zip(ours, theirs, plain.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # the logits route's update
            assert max((a - p).abs().max().item() for a, p in zip(ours, plain.parameters())) > 1e-2  # it moved
            g = hf.generate(plain, data[rank][:, :4], max_new_tokens=3, temperature=0.8,
                            generator=torch.Generator().manual_seed(5))
            assert torch.equal(gen.completion_ids, g.completion_ids)
            torch.testing.assert_close(gen.log_probs, g.log_probs, rtol=1e-6, atol=1e-6)
        dist.barrier()
        _report(out_dir, rank, None)
    except BaseException:
        _report(out_dir, rank, traceback.format_exc())
    finally:
        _leave()


def test_deepspeed_zero3_partitioned_model_trains_as_its_own_logits(tmp_path):
    # ZeRO-3 partitions every parameter, the head's included (an empty tensor
    # outside a forward): pgest's head runs as the head module's forward, where
    # DeepSpeed gathers it (and again before its backward). Two gloo ranks on the
    # CPU, each with its own data, tied and untied Qwen2 in float32: log-probs
    # those of the unpartitioned model bit for bit, one SGD step equal to the step
    # through the model's own logits, generation the unpartitioned model's
    import importlib.util
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if importlib.util.find_spec("deepspeed") is None or not dist.is_available():
        pytest.skip("deepspeed is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_zero3_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    errors = [p.read_text() for p in sorted(tmp_path.glob("err*"))]
    assert not errors, "\n".join(errors)
    assert sorted(p.name for p in tmp_path.glob("ok*")) == ["ok0", "ok1"]
