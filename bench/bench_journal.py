"""The memory-mapped seed table's journal cost: one LOOM call with the table in memory (the baseline), and
memory-mapped with ``durability="crash"`` (journal record appended, no fdatasync) and ``"power"`` (the
record fdatasynced before the table changes), in the same run.

b = 256 of 1,024 points, 2 caches, at D = 2 (where the call is cheap and the journal shows most) and
D = 3072 (CIFAR-shaped). The table file lives in pytest's tmp directory (the local disk).

Run: ``OMP_NUM_THREADS=1 python -m pytest bench/bench_journal.py --benchmark-columns=median,iqr,rounds``
"""

import itertools

import pytest
import torch

from loom_kernels.couplings import LoomCoupling

B, BATCHES, CACHES = 256, 4, 2
SHAPES = {"D=2": (2,), "D=3072": (3, 32, 32)}
ROUNDS = {"D=2": 200, "D=3072": 40}


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("table", ["memory", "mmap-crash", "mmap-power"])
def test_journal_cost(benchmark, table, shape_name, tmp_path):
    torch.set_num_threads(1)
    shape, n = SHAPES[shape_name], B * BATCHES
    g = torch.Generator().manual_seed(0)
    data = torch.randn(n, *shape, generator=g)
    perm = torch.randperm(n, generator=g)
    kw = {} if table == "memory" else {"mmap_path": tmp_path / "table.npy", "durability": table.split("-")[1]}
    coupling = LoomCoupling(n, shape, num_caches=CACHES, seed=0, **kw)
    it = itertools.cycle([(data[perm[a : a + B]], perm[a : a + B]) for a in range(0, n, B)])

    def step():
        x1, idx = next(it)
        return coupling(x1, idx)[0]

    benchmark.group = f"journal cost b={B} {shape_name}"
    benchmark.pedantic(step, rounds=ROUNDS[shape_name], iterations=1, warmup_rounds=5)
    coupling.close()
