"""The three ``torch.library`` custom ops, under their old import path: ``assign``, ``pairwise_cost`` and
``gaussian_noise`` inside ``torch.compile``. Each is registered in its kernel's own module
(``loom_kernels.assign.op``, the end of ``cost.py`` and of ``noise.py``); importing this one registers
all three.

Dynamo cannot trace into the native solver (numpy buffers, raw pointers) or a Triton launch made
from Python, so without the ops every call breaks the graph. Each public function checks
``torch.compiler.is_compiling()`` first and, while Dynamo traces, hands its arguments to its op: the
graph then holds one opaque node per call, whose fake implementation gives the output's shape, dtype
and device (and raises the same error as eager on bad shapes: it runs the same check function), and
whose real implementation runs the eager computation. All three ops are pure (``mutates_args=()``):
they allocate their output and read their inputs only; the noise is a function of the seeds (no
global RNG state), so replaying the graph is exact. The schemas are written out (``schema=``), so no
annotation spelling matters to any torch version.

No autograd formula is registered: the couplings build the cost and the assignment without
gradients. A cost that must carry a gradient under compile is ``loom_kernels.cost.sq_dists``
(plain torch ops).

Example::

    @torch.compile(fullgraph=True)
    def pair(x0, x1, seeds):
        col = assign(pairwise_cost(x0, x1))            # one op each, no graph break
        return x0[col], gaussian_noise(seeds, (3, 32, 32))
"""

from .assign.op import assign_op as assign
from .cost import pairwise_cost_op as pairwise_cost
from .noise import gaussian_noise_op as gaussian_noise

__all__ = ["assign", "pairwise_cost", "gaussian_noise"]
