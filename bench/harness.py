"""What pgest is compared with, and the runner behind ``pgest bench`` (which
loads this file from the checkout's ``bench/``; it is not part of the package).

Providers (the same ones the pytest-benchmark files in ``bench/`` record):

- ``recipe``: the reference recipe (pgest.reference.recipe_step), in eager PyTorch (multinomial, one_hot).
- ``compiled``: the best pure-PyTorch formulation we know, under torch.compile
  (Gumbel-max sampling and a comparison one-hot; log_softmax + gather for losses).
- ``eager``: log_softmax + gather + backward in eager PyTorch.
- ``cross_entropy``: ``cross_entropy(reduction="none") * advantages``.
- ``copy``: a copy of the input, the memory floor of any pass over it.
"""
from __future__ import annotations

import functools
import json
import random
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import pgest
from pgest.examples.memory import allocated_bytes, largest_allocation_bytes, peak_allocated_bytes  # noqa: F401
from pgest.reference import recipe_step

# ---- providers ----------------------------------------------------------------

def lm_args(ap, vocab: int, sequences: int, completion: int):
    """The tiny language-model benchmarks' shape arguments (bench_hf, bench_trl)."""
    ap.add_argument("--out")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--sequences", type=int, default=sequences)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=completion)
    ap.add_argument("--rounds", type=int, default=5)
    return ap


def tiny_qwen2(hidden: int, vocab: int):
    """A randomly initialised 2-layer Qwen2 with tied embeddings (seed 0)."""
    import transformers

    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True))


def gumbel_formulation(log_probs, labels, baseline):
    u = torch.rand(log_probs.shape, dtype=torch.float32, device=log_probs.device)
    actions = torch.argmax(log_probs.float() - torch.log(-torch.log(u)), dim=-1)
    rewards = (actions == labels).float()
    coef = (baseline - rewards) / log_probs.shape[0]
    cols = torch.arange(log_probs.shape[1], device=log_probs.device)
    grad = torch.where(cols[None, :] == actions[:, None], coef[:, None], 0.0).to(log_probs.dtype)
    return actions, rewards, grad


def eager_policy_loss(logits, actions, adv):
    log_probs = torch.log_softmax(logits.float(), -1)
    return -(adv * log_probs.gather(1, actions[:, None])[:, 0]).mean()


def ce_policy_loss(logits, actions, adv):
    return (F.cross_entropy(logits.float(), actions, reduction="none") * adv).mean()


def eager_reinforce(logits, labels, num_samples: int = 4):
    """The reference recipe's steps 1-3 on logits with S samples and a leave-one-out baseline."""
    log_probs = torch.log_softmax(logits.float(), -1)
    with torch.no_grad():
        actions = torch.multinomial(log_probs.exp(), num_samples, replacement=True)
        rewards = (actions == labels[:, None]).float()
        b = (rewards.sum(1, keepdim=True) - rewards) / (num_samples - 1)
    return ((b - rewards) * log_probs.gather(1, actions)).mean()


def pgest_reinforce(logits, labels, num_samples: int = 4):
    return pgest.reinforce(logits, labels, baseline="rloo", num_samples=num_samples).loss


def rl_step_pgest(x):
    """One PPO minibatch step without the network: sample, then log_prob and
    entropy (the RL matrix)."""
    d = pgest.Categorical(logits=x)
    a = d.sample()
    return d.log_prob(a).sum() + d.entropy().sum()


def rl_step_torch(x):
    d = torch.distributions.Categorical(logits=x)
    a = d.sample()
    return d.log_prob(a).sum() + d.entropy().sum()


def rl_step_log_softmax(x):
    ls = torch.log_softmax(x, -1)
    a = torch.multinomial(ls.detach().exp(), 1)
    return ls.gather(-1, a).sum() - (ls.exp() * ls).sum()


def rl_update_pgest(x, actions, adv):
    """The PPO update's pattern: log_prob of stored actions and the entropy,
    no sampling."""
    d = pgest.Categorical(logits=x)
    return (d.log_prob(actions) * adv).sum() + d.entropy().sum()


def rl_update_torch(x, actions, adv):
    d = torch.distributions.Categorical(logits=x)
    return (d.log_prob(actions) * adv).sum() + d.entropy().sum()


def rl_update_log_softmax(x, actions, adv):
    ls = torch.log_softmax(x, -1)
    return (ls.gather(-1, actions[:, None]).squeeze(-1) * adv).sum() - (ls.exp() * ls).sum()


@functools.lru_cache(maxsize=None)
def compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def train_step(loss_fn, logits, *args) -> Callable[[], None]:
    """Forward + backward of loss_fn(logits, *args), fresh .grad each time."""
    def run():
        logits.grad = None
        loss_fn(logits, *args).backward()
    return run


# ---- measuring ------------------------------------------------------------------

def median_seconds(fn: Callable[[], object], repeats: int = 15, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: Dict[str, Callable[[], object]], rounds: int = 15,
                        round_seconds: float = 20e-3) -> Dict[str, float]:
    """Median seconds per call of each fn, timed in alternation: every round
    runs each fn for about ``round_seconds``, in a fresh random order. A
    shared machine's slow spells then fall on all of them alike, so the
    ratios hold even where the absolute times drift (sequential timing of one
    fn after the other gave the same call 0.14 and 0.24 ms minutes apart
    here). The order is shuffled, not rotated: under a rotation each fn
    always follows the same other one and inherits its after-effects (a
    compiled provider's threads and cache footprint cost the next call
    here about 20%).

    Rounds are long (20 ms) because those after-effects last: at 64 x 2 the
    first RL step after 2 ms of another provider took 1.1-1.5x a step that
    follows its own kind, the next ones up to 1.2x, and torch.distributions'
    step stayed 1.2x slower for eight calls after pgest's
    (bench/results/cpu-switch-cost-2026-11-21.txt, bench/switch_cost.py).
    Causes seen here: the other provider's OpenMP workers and its garbage
    (OMP_WAIT_POLICY=PASSIVE and gc.disable() each changed the toll), and
    presumably cold caches.
    With 2 ms rounds, about 15 calls at that size, the toll was a sizeable
    share of each median: the five recorded runs put pgest at 0.83-1.00x of eager
    log_softmax + gather at 64 x 2, while three runs with 20 ms rounds gave
    1.17-1.20x. A call longer than a round runs once per round."""
    names = list(fns)
    order = random.Random(0)
    iters = {}
    for n in names:  # warm up, and calls per round (one, without a timing call, for round_seconds <= 0)
        fns[n]()
        if round_seconds <= 0:
            iters[n] = 1
            continue
        t0 = time.perf_counter()
        fns[n]()
        iters[n] = max(1, int(round_seconds / max(time.perf_counter() - t0, 1e-7)))
    times: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in order.sample(names, len(names)):
            f, k = fns[n], iters[n]
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            times[n].append((time.perf_counter() - t0) / k)
    return {n: statistics.median(v) for n, v in times.items()}


def machine_info() -> Dict[str, object]:
    """What a results file says of the machine it was measured on."""
    import platform

    info: Dict[str, object] = {"machine": platform.machine(), "torch": torch.__version__,
                               "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def write_results(path: Optional[str], **fields) -> Dict[str, object]:
    """The machine (machine_info) and ``fields`` as one JSON results file at
    ``path`` (nothing written without one); returns the record."""
    record = dict(machine_info(), **fields)
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
    return record


def record_interleaved(benchmark, op: str, shape, dtype: str, fns: Dict[str, Callable[[], object]],
                       rounds: int = 15, with_memory: bool = True) -> None:
    """One pytest-benchmark test for every provider of a (op, shape, dtype):
    their interleaved medians (and the bytes each call allocates) go into
    ``extra_info``, from which bench/report.py builds the table; the test's
    own statistics are pgest's."""
    medians = interleaved_medians(fns, rounds)
    benchmark.group = f"{op} {shape[0]}x{shape[1]} {dtype}"
    benchmark.extra_info.update(op=op, shape=list(shape), dtype=dtype, provider="pgest", interleaved_seconds=medians)
    if with_memory:
        benchmark.extra_info["alloc_bytes_by_provider"] = {k: allocated_bytes(f) for k, f in fns.items()}
    benchmark.pedantic(fns["pgest"], rounds=rounds, iterations=1, warmup_rounds=1)


# ---- the runner of `pgest bench` -------------------------------------------------

REINFORCE_GRAD_SHAPES = [(4096, 10), (1024, 1000), (256, 32000), (64, 128000)]
LOSS_SHAPES = [(1024, 1000), (256, 32000), (64, 128000)]
QUICK_SHAPES = [(512, 100), (64, 4000)]
RL_ROWS, RL_KS = [64, 512, 4096, 32768], [2, 6, 18, 100]
RL_QUICK_SHAPES = [(64, 6), (4096, 18)]
RL_OP = "rl step (Categorical sample + log_prob + entropy, fwd+bwd)"
RL_UPDATE_OP = "ppo update (Categorical log_prob of stored actions + entropy, fwd+bwd)"


def _inputs(B, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=g).to(dtype)
    labels = torch.randint(0, K, (B,), generator=g)
    return logits, labels, torch.rand(B, generator=g), torch.randn(B, generator=g)


def run(quick: bool = False, with_compiled: Optional[bool] = None, repeats: int = 15,
        progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Time every op against its providers; one dict per (op, shape, dtype,
    provider) with the median seconds and the bytes the call allocates. The
    providers of an (op, shape, dtype) are timed in alternation
    (interleaved_medians). ``quick``: two small shapes, fp32, 5 rounds and no
    torch.compile."""
    with_compiled = (not quick) if with_compiled is None else with_compiled
    repeats = 5 if quick else repeats
    dtypes = {"fp32": torch.float32} if quick else {"fp32": torch.float32, "bf16": torch.bfloat16}
    rl_shapes = RL_QUICK_SHAPES if quick else [(r, k) for r in RL_ROWS for k in RL_KS]
    if with_compiled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(rl_shapes) + 32)
        # no pool of compile workers busy in the background while timing
        torch._inductor.config.compile_threads = 1
    rows: List[Dict] = []

    def record(op, shape, dtype, fns, with_memory=True):
        fns = {k: f for k, f in fns.items() if f is not None}
        if progress:
            progress(f"{op} {shape[0]}x{shape[1]} {dtype} ({', '.join(fns)}, interleaved)")
        for provider, sec in interleaved_medians(fns, repeats).items():
            rows.append({"op": op, "shape": list(shape), "dtype": dtype, "provider": provider, "seconds": sec,
                         "alloc_bytes": allocated_bytes(fns[provider]) if with_memory else None})

    for shape in (QUICK_SHAPES if quick else REINFORCE_GRAD_SHAPES):
        for dname, dtype in dtypes.items():
            logits, labels, baseline, _ = _inputs(*shape, dtype)
            log_probs = logits.float().log_softmax(-1).to(dtype)
            f = compiled(gumbel_formulation) if with_compiled else None
            record("reinforce_grad", shape, dname, {
                "pgest": lambda: pgest.reinforce_grad(log_probs, labels, baseline=baseline),
                "recipe": lambda: recipe_step(log_probs, labels, baseline),
                "compiled": f and (lambda: f(log_probs, labels, baseline)),
                "copy": lambda: log_probs.clone()})
    for shape in (QUICK_SHAPES if quick else LOSS_SHAPES):
        for dname, dtype in dtypes.items():
            logits, labels, _, adv = _inputs(*shape, dtype)
            x = logits.requires_grad_()
            record("policy_loss fwd+bwd", shape, dname, {
                "pgest": train_step(lambda a, b, c: pgest.policy_loss(a, b, c), x, labels, adv),
                "eager": train_step(eager_policy_loss, x, labels, adv),
                "compiled": train_step(compiled(eager_policy_loss), x, labels, adv) if with_compiled else None,
                "cross_entropy": train_step(ce_policy_loss, x, labels, adv),
                "copy": lambda: x.detach().clone()})
            if dname == "fp32":
                record("reinforce fwd+bwd (S=4, rloo)", shape, dname, {
                    "pgest": train_step(pgest_reinforce, x, labels),
                    "eager": train_step(eager_reinforce, x, labels),
                    "compiled": train_step(compiled(eager_reinforce), x, labels) if with_compiled else None,
                    "copy": lambda: x.detach().clone()})
    rl_compiled = compiled(rl_step_log_softmax) if with_compiled else None
    for shape in rl_shapes:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
        record(RL_OP, shape, "fp32", rl_providers(x, rl_compiled), with_memory=False)
    return rows


def rl_providers(x: torch.Tensor, compiled_step=None) -> Dict[str, Callable[[], None]]:
    """One RL-matrix step of each provider on logits x (requires grad)."""
    fns = {"pgest": train_step(rl_step_pgest, x), "torch_categorical": train_step(rl_step_torch, x),
           "log_softmax_gather": train_step(rl_step_log_softmax, x)}
    if compiled_step is not None:
        fns["log_softmax_gather_compiled"] = train_step(compiled_step, x)
    return fns


def table(rows: List[Dict]) -> str:
    """Markdown, one table per op: times, "x P" = how many times faster pgest is
    than provider P, "/ copy" = pgest's time over the copy's, allocated MiB."""
    ops: Dict[str, Dict] = {}
    for r in rows:
        ops.setdefault(r["op"], {}).setdefault((tuple(r["shape"]), r["dtype"]), {})[r["provider"]] = r
    out = []
    for op, groups in ops.items():
        providers = []
        for g in groups.values():
            providers += [p for p in g if p not in providers and p not in ("pgest", "copy")]
        with_mem = any(r.get("alloc_bytes") is not None for g in groups.values() for r in g.values())
        head = ["shape (B, K)", "dtype", "pgest ms"] + [f"{p} ms" for p in providers] + ["copy ms"]
        head += [f"x {p}" for p in providers] + ["/ copy"]
        if with_mem:
            head += ["pgest MiB"] + [f"{p} MiB" for p in providers]
        lines = [f"**{op}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (shape, dtype), g in groups.items():
            if "pgest" not in g:
                continue
            p = g["pgest"]["seconds"]

            def ms(name):
                return f"{g[name]['seconds'] * 1e3:.3f}" if name in g else "-"

            def mib(name):
                alloc = g[name].get("alloc_bytes") if name in g else None
                return f"{alloc / 2**20:.1f}" if alloc is not None else "-"

            cells = [f"{shape[0]} x {shape[1]}", dtype, ms("pgest")] + [ms(q) for q in providers] + [ms("copy")]
            cells += [f"{g[q]['seconds'] / p:.1f}x" if q in g else "-" for q in providers]
            cells += [f"{p / g['copy']['seconds']:.2f}" if "copy" in g else "-"]
            if with_mem:
                cells += [mib("pgest")] + [mib(q) for q in providers]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot(rows: List[Dict], path: str) -> None:
    """Bar chart: for each op and shape, how many times faster pgest is than
    each provider (log scale; the line at 1 is parity)."""
    from pgest.examples import require

    plt = require("matplotlib.pyplot")
    ops: Dict[str, Dict] = {}
    for r in rows:
        ops.setdefault(r["op"], {}).setdefault(f"{r['shape'][0]}x{r['shape'][1]} {r['dtype']}", {})[r["provider"]] = r
    fig, axes = plt.subplots(len(ops), 1, figsize=(9, 3.2 * len(ops)), squeeze=False)
    for ax, (op, groups) in zip(axes[:, 0], ops.items()):
        providers = []
        for g in groups.values():
            providers += [p for p in g if p not in providers and p != "pgest"]
        labels = list(groups)
        width = 0.8 / max(1, len(providers))
        for j, prov in enumerate(providers):
            vals = [groups[label][prov]["seconds"] / groups[label]["pgest"]["seconds"] if prov in groups[label] else 0
                    for label in labels]
            ax.bar([i + j * width for i in range(len(labels))], vals, width, label=prov)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=8, rotation=20, ha="right")
        ax.set_ylabel("provider time / pgest time")
        ax.set_title(op)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
