"""torch.compile over assign / pairwise_cost / gaussian_noise: custom ops, no graph break (issue 22).

The compiled minibatch-OT step (noise -> cost -> assignment -> paired batch) must trace as one
graph (torch._dynamo.explain), give eager's result exactly, and raise eager's error on a bad
shape; a compiled model's training step runs beside an (eager) coupling call.
"""

import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from loom_kernels import ops
from loom_kernels.assign import assign
from loom_kernels.cost import pairwise_cost
from loom_kernels.couplings import MinibatchOTCoupling
from loom_kernels.noise import gaussian_noise


def ot_step(x1, seeds):
    """The minibatch-OT pairing a training step makes: noise, cost, exact assignment, pairs."""
    x0 = gaussian_noise(seeds, x1.shape[1:])
    cost = pairwise_cost(x1.flatten(1), x0.flatten(1))
    col = assign(cost)
    return x0[col], cost, col


def _problem(b=12, shape=(3, 2, 2)):
    return torch.randn(b, *shape), torch.randint(-(2**62), 2**62, (b,))


def test_ops_are_registered_with_their_schemas():
    # Pure functions: nothing mutated, nothing aliased (a "!" or "(a" would mark it).
    for name in ("assign", "pairwise_cost", "gaussian_noise"):
        schema = str(getattr(torch.ops.loom_kernels, name).default._schema)
        assert "!" not in schema and "(a" not in schema, schema
    x1, seeds = _problem()
    cost = pairwise_cost(x1.flatten(1), gaussian_noise(seeds, (12,)))
    # opcheck: fake vs real outputs, the schema's mutation claims, dispatch registration.
    torch.library.opcheck(torch.ops.loom_kernels.assign.default, (cost, "auto", None, "auto", False, None))
    x = x1.flatten(1)
    torch.library.opcheck(torch.ops.loom_kernels.pairwise_cost.default, (x, x, "sqeuclidean", False))
    torch.library.opcheck(torch.ops.loom_kernels.gaussian_noise.default, (seeds, [3, 4], None, torch.float32))


def test_op_outputs_match_the_public_functions():
    x1, seeds = _problem()
    x0 = ops.gaussian_noise(seeds, (3, 2, 2))
    assert torch.equal(x0, gaussian_noise(seeds, (3, 2, 2)))
    c = ops.pairwise_cost(x1.flatten(1), x0.flatten(1), "euclidean")
    assert torch.equal(c, pairwise_cost(x1.flatten(1), x0.flatten(1), "euclidean"))
    col = ops.assign(c.double(), maximize=True)
    _, ref = scipy_lsa(c.double().numpy(), maximize=True)
    assert col.tolist() == ref.tolist()


def test_compiled_step_has_no_graph_break():
    x1, seeds = _problem()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ot_step)(x1, seeds)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # Each public call became its custom op in the graph (not a trace through Python).
    targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    for name in ("assign", "pairwise_cost", "gaussian_noise"):
        assert f"loom_kernels.{name}.default" in targets, targets


def test_compiled_step_equals_eager_and_scipy():
    x1, seeds = _problem(b=16)
    torch._dynamo.reset()
    step = torch.compile(ot_step, fullgraph=True)  # inductor, as a user compiles
    pairs, cost, col = step(x1, seeds)
    e_pairs, e_cost, e_col = ot_step(x1, seeds)
    assert torch.equal(col, e_col) and torch.equal(pairs, e_pairs) and torch.equal(cost, e_cost)
    _, ref = scipy_lsa(cost.double().numpy())
    c64 = cost.double()
    assert float(c64[torch.arange(16), col].sum()) == pytest.approx(float(c64[torch.arange(16), ref].sum()), rel=1e-6)


def test_compiled_batched_cost_and_list_seeds():
    def f(x, y):
        c = pairwise_cost(x, y)  # (B, N, M) with a shared 2-D y
        return assign(c), gaussian_noise([1, -2, 3], 5, dtype=torch.float64)

    x, y = torch.randn(3, 4, 6), torch.randn(5, 6)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y)
    want = f(x, y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[1].dtype == torch.float64


@pytest.mark.parametrize(
    "fn, args",
    [
        (lambda c: assign(c), (torch.randn(5, 3),)),  # N > M
        (lambda c: assign(c), (torch.randn(4),)),  # not a matrix
        (lambda x, y: pairwise_cost(x, y), (torch.randn(4, 3), torch.randn(4, 5))),  # D differs
        (lambda x, y: pairwise_cost(x, y), (torch.randn(2, 4, 3), torch.randn(3, 4, 3))),  # B differs
        (lambda s: gaussian_noise(s, (2, 2)), (torch.zeros(2, 2, dtype=torch.int64),)),  # seeds not 1-D
    ],
)
def test_bad_shape_under_compile_raises_eager_error(fn, args):
    with pytest.raises((ValueError, TypeError)) as eager:
        fn(*args)
    torch._dynamo.reset()
    # Default compile: the frame falls back to eager, so the very same exception type and text.
    with pytest.raises(type(eager.value)) as compiled:
        torch.compile(fn, backend="aot_eager")(*args)
    assert str(compiled.value) == str(eager.value)
    # fullgraph=True cannot fall back: Dynamo raises its own error, which carries eager's message
    # (torch 2.4 says only "Observed exception" and points at the line).
    torch._dynamo.reset()
    with pytest.raises(Exception) as full:
        torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    assert str(eager.value) in str(full.value) or "Observed exception" in str(full.value)


def test_wrong_device_under_compile_raises_eager_error():
    # #34 item 12: a host tensor with backend="cuda" gave Dynamo's TorchRuntimeError (raised by the fake
    # implementation); now eager's own exception: ValueError on a CUDA build, the "built without CUDA"
    # RuntimeError on a CPU-only one.
    def fn(c):
        return assign(c, backend="cuda")

    c = torch.randn(4, 4)
    with pytest.raises((ValueError, RuntimeError)) as eager:
        fn(c)
    torch._dynamo.reset()
    with pytest.raises(type(eager.value)) as compiled:
        torch.compile(fn, backend="aot_eager")(c)
    assert str(compiled.value) == str(eager.value) and "backend='cuda'" in str(eager.value)


def test_fake_impl_raises_eager_message_for_the_op_itself():
    # Straight to the op (no Python-side check): the fake implementation names the same problem.
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        c = mode.from_tensor(torch.randn(5, 3))
        with pytest.raises(ValueError, match=r"assign needs N <= M"):
            torch.ops.loom_kernels.assign(c, "auto", None, "auto", False, None)


def test_compiled_model_training_step_beside_a_coupling():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    coupling = MinibatchOTCoupling()

    @torch.compile(backend="aot_eager")
    def train_step(x0, x1, t):
        xt = (1 - t) * x0 + t * x1
        v = model(torch.cat([xt, t], dim=1))
        return ((v - (x1 - x0)) ** 2).mean()

    data = torch.randn(64, 8) + 3.0
    losses = []
    for step in range(6):
        idx = torch.arange(step * 8, step * 8 + 8) % 64
        x0, x1 = coupling(data[idx])[:2]  # eager coupling, compiled model
        loss = train_step(x0, x1, torch.rand(8, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.cuda
def test_compiled_step_on_cuda_equals_eager():
    x1, seeds = _problem(b=64, shape=(3, 8, 8))
    x1, seeds = x1.cuda(), seeds.cuda()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ot_step)(x1, seeds)
    assert explained.graph_break_count == 0, explained.break_reasons
    got = torch.compile(ot_step, fullgraph=True)(x1, seeds)
    want = ot_step(x1, seeds)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].device.type == "cuda" and got[2].device.type == "cuda"


@pytest.mark.slow  # heavy; CI runs it in its slow step
def test_first_call_compiled_registers_the_op_itself():
    # Eager calls never import loom_kernels.assign.op (nor register the op); a first call under
    # compile imports it while Dynamo traces, and still makes one graph.
    import subprocess
    import sys

    code = (
        "import sys, torch; from loom_kernels.assign import assign; c = torch.randn(6, 6); assign(c); "
        "assert 'loom_kernels.assign.op' not in sys.modules; "
        "f = torch.compile(lambda c: assign(c), fullgraph=True, backend='aot_eager'); "
        "assert torch.equal(f(c), assign(c)); print('loom_kernels.assign.op' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "True"
