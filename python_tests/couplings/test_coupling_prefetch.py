"""PrefetchCoupling: the background-thread path equals the synchronous one bit for bit; errors reach result()."""

import threading

import pytest
import torch

from loom_kernels.couplings import LoomCoupling, MinibatchOTCoupling
from loom_kernels.couplings.prefetch import PrefetchCoupling

P, SHAPE, B, STEPS = 40, (2, 3), 8, 5


def _batches():
    g = torch.Generator().manual_seed(3)
    data, y = torch.randn((P, *SHAPE), generator=g), torch.randint(3, (P,), generator=g)
    out = []
    for step in range(STEPS):
        idx = torch.randperm(P, generator=g)[:B]
        if step == 2:
            idx[1] = idx[0]  # a refused batch: the error must come back through result()
        out.append((data[idx], idx, y[idx] if step % 2 else None))
    return out


def _sync(c, batches):
    res = []
    for x1, idx, lab in batches:
        try:
            res.append((c(x1, idx, labels=lab)[0], dict(c.stats)))
        except ValueError as exc:
            res.append(str(exc))
    return res


def _prefetched(c, batches):
    res = []
    with PrefetchCoupling(c) as pre:
        futures = [pre.submit(x1, idx, labels=lab) for x1, idx, lab in batches]  # all queued at once
        for f in futures:
            try:
                res.append((f.result()[0], f.stats))
            except ValueError as exc:
                res.append(str(exc))
    return res


@pytest.mark.parametrize("scope", ["global", "grouped"])
def test_prefetch_equals_the_synchronous_path(scope):
    def make():
        return LoomCoupling(P, SHAPE, num_caches=2, seed=4, scope=scope, group_size=5)

    a, b = make(), make()
    batches = _batches()
    want, got = _sync(a, batches), _prefetched(b, batches)
    assert isinstance(got[2], str) and "must be distinct" in got[2] and got[2] == want[2]
    for w, g in zip(want, got):
        if isinstance(w, str):
            continue
        assert torch.equal(w[0], g[0])
        assert all(torch.equal(w[1][k], g[1][k]) for k in w[1])
    assert torch.equal(a.seeds, b.seeds) and torch.equal(a._gen.get_state(), b._gen.get_state())
    assert not torch.equal(a.seeds, make().seeds)


def test_prefetch_minibatch_ot_and_overlap():
    x1s = [torch.randn(B, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    gens = [torch.Generator().manual_seed(1) for _ in range(2)]  # the global RNG would interleave threads
    a, b = (MinibatchOTCoupling(generator=g) for g in gens)
    want = [a(x)[0] for x in x1s]
    with PrefetchCoupling(b) as pre:
        got = [f.result()[0] for f in [pre.submit(x) for x in x1s]]
    assert all(torch.equal(w, g) for w, g in zip(want, got))

    gate = threading.Event()

    def slow(x1, *, indices=None, labels=None):
        assert gate.wait(30)
        return x1 + 1, x1

    slow.stats = {}
    with PrefetchCoupling(slow) as pre:
        fut = pre.submit(torch.zeros(2, 1))
        assert not fut.done()  # submit returned while the call is still running: the caller is free
        gate.set()
        assert torch.equal(fut.result(timeout=30)[0], torch.ones(2, 1))


def test_prefetch_refuses_a_shared_process_group(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    with pytest.raises(ValueError, match="its own process group"):
        PrefetchCoupling(MinibatchOTCoupling())
    with pytest.raises(TypeError, match="coupling must be a Coupling"):
        PrefetchCoupling(3)


@pytest.mark.cuda
def test_prefetch_on_a_side_stream_equals_the_synchronous_path():
    def make():
        return LoomCoupling(P, SHAPE, num_caches=2, seed=4, device="cuda")

    a, b = make(), make()
    batches = [(x1.cuda() * 1.0, idx, None if lab is None else lab.cuda()) for x1, idx, lab in _batches()]
    want, got = _sync(a, batches), _prefetched(b, batches)
    for w, g in zip(want, got):
        assert (w == g) if isinstance(w, str) else torch.equal(w[0], g[0])
    assert torch.equal(a.seeds, b.seeds)
