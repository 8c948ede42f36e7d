"""Deferred device errors (pgest/device_errors.py): the bookkeeping and the
messages, driven here by hand-written error words on the CPU, where words
land at once. What the CUDA kernels write into those words, and that a
training step stays free of host synchronisation, is tested in test_cuda.py
on a GPU."""
import os
import subprocess
import sys

import pytest
import torch

import pgest
from pgest import device_errors

NO_ERROR = 2**63 - 1
# status codes of csrc/include/pgest/status.h
NONFINITE_INPUT, ALL_NEG_INF, LABEL_OUT_OF_RANGE, NONFINITE_REWARD, ACTION_OUT_OF_RANGE = 1, 2, 3, 4, 11

LOGITS = dict(input_name="logits", num_actions=10)


def word(row=None, status=0, col=0):
    """The (2,) word a kernel leaves: (row * 32 + status, col), or untouched."""
    if row is None:
        return torch.tensor([NO_ERROR, NO_ERROR])
    return torch.tensor([row * 32 + status, col])


@pytest.fixture(autouse=True)
def deferred():
    """These tests defer (the suite otherwise checks synchronously) and leave
    nothing pending behind them."""
    with pgest.sync_errors(False):
        yield
        try:
            pgest.check_errors()
        except (ValueError, IndexError):
            pass
    assert device_errors.pending() == 0


def test_nothing_pending_is_a_no_op():
    pgest.check_errors()
    device_errors.defer(word(), None, "pgest sample", LOGITS)
    assert device_errors.pending() == 1
    pgest.check_errors()
    assert device_errors.pending() == 0


def test_first_error_in_call_order_is_raised_once():
    device_errors.defer(word(), None, "pgest sample", LOGITS)
    device_errors.defer(word(7, NONFINITE_INPUT, 2), None, "pgest log_prob_forward", LOGITS)
    device_errors.defer(word(1, ALL_NEG_INF, -1), None, "pgest sample", LOGITS)  # later call, lower row
    with pytest.raises(ValueError, match=r"logits\[7, 2\] is NaN or \+inf.*earlier pgest log_prob_forward call"):
        pgest.check_errors()
    # reported once: the rest went with it
    assert device_errors.pending() == 0
    pgest.check_errors()


def test_lowest_row_of_one_word_decodes():
    # row 2**40: the packing keeps 64-bit rows
    device_errors.defer(word(2**40, ALL_NEG_INF, -1), None, "pgest sample", LOGITS)
    with pytest.raises(ValueError, match=rf"logits\[{2**40}\] is all -inf"):
        pgest.check_errors()


@pytest.mark.parametrize("status, col, report, exc, message", [
    (ACTION_OUT_OF_RANGE, 0, dict(input_name="logits", num_actions=10, samples_per_row=1, ignore_index=-100),
     IndexError, r"actions\[5\] is out of range for 10 actions and is not ignore_index \(-100\)"),
    (ACTION_OUT_OF_RANGE, 3, dict(input_name="logits", num_actions=10, samples_per_row=4, ignore_index=None),
     IndexError, r"actions\[5, 3\] is out of range for 10 actions \("),
    (LABEL_OUT_OF_RANGE, 400, dict(input_name="log_probs", num_actions=300), IndexError,
     r"labels\[5\] = 400 is out of range for 300 actions"),
    (NONFINITE_REWARD, 7, dict(input_name="log_probs", num_actions=10), ValueError,
     r"reward_table\[5, 7\] \(sampled in row 5\) is not finite"),
    (NONFINITE_REWARD, 7, dict(input_name="log_probs", num_actions=10, table_is_vector=True), ValueError,
     r"reward_table\[7\] \(sampled in row 5\)"),
])
def test_messages_without_the_values(status, col, report, exc, message):
    device_errors.defer(word(5, status, col), None, "pgest op", report)
    with pytest.raises(exc, match=message):
        pgest.check_errors()


def test_errors_surface_at_the_flush_without_check_errors():
    """A loop that never calls check_errors still hears of an error: within
    FLUSH_EVERY launches, from the pgest call that reads the landed words."""
    device_errors.defer(word(3, NONFINITE_INPUT, 1), None, "pgest sample", LOGITS)
    for _ in range(device_errors.FLUSH_EVERY - 2):
        device_errors.defer(word(), None, "pgest sample", LOGITS)
    assert device_errors.pending() == device_errors.FLUSH_EVERY - 1
    with pytest.raises(ValueError, match=r"logits\[3, 1\]"):
        device_errors.defer(word(), None, "pgest sample", LOGITS)
    assert device_errors.pending() == 0


def test_clean_words_do_not_pile_up():
    for _ in range(3 * device_errors.FLUSH_EVERY + 5):
        device_errors.defer(word(), None, "pgest sample", LOGITS)
    assert device_errors.pending() == 5


def test_switching_to_synchronous_checks_raises_what_is_deferred():
    device_errors.defer(word(0, ALL_NEG_INF, -1), None, "pgest sample", LOGITS)
    with pytest.raises(ValueError, match=r"logits\[0\] is all -inf"):
        pgest.set_sync_errors(True)
    assert device_errors.synchronous()  # the switch is made
    assert device_errors.pending() == 0


def test_sync_switch_and_context_manager():
    assert not device_errors.synchronous()
    with pgest.sync_errors():
        assert device_errors.synchronous()
        with pgest.sync_errors(False):
            assert not device_errors.synchronous()
        assert device_errors.synchronous()
    assert not device_errors.synchronous()
    assert pgest.set_sync_errors(True) is False
    assert pgest.set_sync_errors(False) is True
    with pytest.raises(TypeError, match="enabled must be a bool"):
        pgest.set_sync_errors(1)
    with device_errors.checked_now():
        assert device_errors.synchronous()
    assert not device_errors.synchronous()


def test_cpu_ops_raise_at_the_call_in_either_mode():
    x = torch.randn(4, 6)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[2, 1\] is nan"):
        pgest.sample(x)
    with pytest.raises(IndexError, match=r"actions\[1\] = 9 is out of range"):
        pgest.log_prob(torch.randn(4, 6), torch.tensor([0, 9, 1, 2]))
    assert device_errors.pending() == 0


def test_environment_variable_turns_synchronous_checks_on(tmp_path):
    code = "import pgest; from pgest import device_errors; print(device_errors.synchronous())"
    for value, expected in (("1", "True"), ("0", "False"), ("", "False")):
        env = dict(os.environ, PGEST_SYNC_ERRORS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)  # the installed pgest, not a checkout's
        assert out.stdout.strip() == expected, out.stderr


@pytest.fixture
def checks_on_device(monkeypatch):
    """Checks made with torch ops (pgest.reinforce's rewards) take their
    deferred route on the CPU too: the same tensor code as on a GPU."""
    monkeypatch.setattr(device_errors, "defers", lambda t: True)


@pytest.mark.parametrize("kind", ["label", "action", "reward", "baseline"])
def test_reinforce_checks_on_the_device_poison_and_defer(checks_on_device, kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (6,), generator=g)
    kwargs = dict(num_samples=2, generator=g)
    if kind == "label":
        labels[4], labels[2] = 9, -1  # row 2 is reported, rows 2 and 4 poisoned
        out = pgest.reinforce(x, labels, **kwargs)
        message, exc, bad_rows = r"labels\[2\] = -1 is out of range for 5 actions", IndexError, [2, 4]
    elif kind == "baseline":
        base = torch.zeros(6)
        base[3] = float("inf")
        out = pgest.reinforce(x, labels, baseline=base, **kwargs)
        message, exc, bad_rows = r"baseline\[3\] is not finite", ValueError, [3]
    else:
        table = torch.randn(6, 5, generator=g)
        if kind == "reward":
            table[:, 1] = float("nan")  # every row that draws action 1
            x = torch.zeros(6, 5).index_fill_(1, torch.tensor([1]), 30.0).requires_grad_()
            out = pgest.reinforce(x, reward_table=table, **kwargs)
            message, exc, bad_rows = r"reward_table\[0, 1\] \(sampled in row 0\) is not finite", ValueError, range(6)
        else:  # actions come from the sampler, always in range: the registered op's own check
            acts = torch.tensor([[0, 1], [2, 7], [1, 1]])
            rewards, weights = torch.ops.pgest.reinforce_weights(acts, None, table[:3], 0, 0.0, None, 5, [3],
                                                                 torch.float32)
            assert rewards[1, 1].isnan() and torch.isfinite(rewards[[0, 2]]).all() and rewards[1, 0] == table[1, 2]
            with pytest.raises(IndexError, match=r"actions\[1, 1\] is out of range for 5 actions"):
                pgest.check_errors()
            return
    assert torch.isnan(out.loss)
    assert out.rewards[bad_rows].isnan().all() if kind != "baseline" else torch.isfinite(out.rewards).all()
    out.loss.backward()
    assert x.grad.isnan().any()
    with pytest.raises(exc, match=message + r".*earlier pgest reinforce call"):
        pgest.check_errors()


def test_leaving_a_deferred_block_for_synchronous_checks_raises_what_it_left():
    with pgest.sync_errors():
        with pytest.raises(ValueError, match=r"logits\[4\] is all -inf"):
            with pgest.sync_errors(False):
                device_errors.defer(word(4, ALL_NEG_INF, -1), None, "pgest sample", LOGITS)
        assert device_errors.synchronous() and device_errors.pending() == 0


def test_truncated_scoring_defers_an_action_outside_the_kept_set(checks_on_device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, generator=g, requires_grad=True)
    actions = x.detach().argmax(-1)
    actions[1, 2] = x.detach()[1, 2].argmin()  # outside top-3
    lp, ent = pgest.log_prob(x, actions, top_k=3, temperature=0.7)
    bad = torch.zeros(2, 3, dtype=torch.bool)
    bad[1, 2] = True
    assert lp[bad].isnan().all() and ent[bad].isnan().all()  # poisoned, nothing read back
    assert torch.isfinite(lp[~bad]).all() and torch.isfinite(ent[~bad]).all()
    (lp.sum() + ent.sum()).backward()
    assert x.grad[1, 2].isnan().any() and torch.isfinite(x.grad[0]).all()  # NaN on the kept entries
    with pytest.raises(ValueError, match=r"actions\[1, 2\] is outside the kept set.*earlier pgest log_prob call"):
        pgest.check_errors()
