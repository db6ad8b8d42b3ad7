"""TorchCFM's API on loom_kernels: change the import line, keep the script.

``torchcfm.conditional_flow_matching`` -> ``loom_kernels.compat.torchcfm.conditional_flow_matching``,
``torchcfm.optimal_transport`` -> ``loom_kernels.compat.torchcfm.optimal_transport``,
``torchcfm.utils`` -> ``loom_kernels.compat.torchcfm.utils``, ``torchcfm.models`` ->
``loom_kernels.compat.torchcfm.models``; every name is also
importable from ``loom_kernels.compat.torchcfm`` itself (as ``from torchcfm import ...`` gives the
matchers). Modules: :mod:`.optimal_transport` (``OTPlanSampler``, ``wasserstein``; plans in
``_plans``), :mod:`.conditional_flow_matching` (the five flow matchers, ``pad_t_like_x``),
:mod:`.loom` (``LoomConditionalFlowMatcher``, new), :mod:`.semidiscrete` (``KNNConditionalFlowMatcher``,
``SemidiscreteConditionalFlowMatcher``, new), :mod:`.utils` (``torch_wrapper``, the tutorials' toy
samplers and ``plot_trajectories``), :mod:`.models` (``MLP``, ``GradModel``, ``models.unet.UNetModel``). Sampling
without torchdyn: :mod:`loom_kernels.compat.torchdyn`. Imports neither torchcfm nor POT.
"""

from .conditional_flow_matching import (
    ConditionalFlowMatcher,
    ExactOptimalTransportConditionalFlowMatcher,
    SchrodingerBridgeConditionalFlowMatcher,
    TargetConditionalFlowMatcher,
    VariancePreservingConditionalFlowMatcher,
    pad_t_like_x,
)
from .loom import LoomConditionalFlowMatcher
from .optimal_transport import OTPlanSampler, wasserstein
from .semidiscrete import KNNConditionalFlowMatcher, SemidiscreteConditionalFlowMatcher
from .utils import torch_wrapper

__all__ = [
    "OTPlanSampler",
    "wasserstein",
    "pad_t_like_x",
    "ConditionalFlowMatcher",
    "ExactOptimalTransportConditionalFlowMatcher",
    "TargetConditionalFlowMatcher",
    "SchrodingerBridgeConditionalFlowMatcher",
    "VariancePreservingConditionalFlowMatcher",
    "LoomConditionalFlowMatcher",
    "KNNConditionalFlowMatcher",
    "SemidiscreteConditionalFlowMatcher",
    "torch_wrapper",
]
