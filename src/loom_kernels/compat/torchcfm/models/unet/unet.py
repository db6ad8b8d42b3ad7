"""TorchCFM's image ``UNetModel`` (``torchcfm.models.unet.UNetModelWrapper``): its constructor and call
convention on loom_kernels' own :class:`loom_kernels.models.UNet`.

Same: the arguments (``dim=(C, H, W)``, ``num_channels``, ``num_res_blocks``, ``channel_mult`` with
TorchCFM's defaults per image size, ``class_cond``/``num_classes``, ...), ``forward(t, x, y=None)`` with
``t`` of shape ``(B,)``, ``(B, k)`` (first column used) or 0-dim (one time for the batch, as torchdyn
passes it), ``y`` required exactly when ``class_cond``. So TorchCFM's image scripts and a
``NeuralODE(model, ...)`` run with the import line changed.

Not the same network: ours has one residual block per level and no attention, so ``num_res_blocks``,
``attention_resolutions``, the head counts, ``dropout``, ``use_checkpoint``, ``use_fp16``,
``use_scale_shift_norm``, ``resblock_updown`` and ``use_new_attention_order`` are accepted and do not
change it; parameter counts, initial weights and checkpoints differ from TorchCFM's. ``learn_sigma``
(a second output for the variance, unused by flow matching) is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .....models import UNet

__all__ = ["UNetModelWrapper", "UNetModel", "NUM_CLASSES"]

NUM_CLASSES = 1000
#: TorchCFM's channel multipliers per image size when ``channel_mult`` is None (512's 0.5 is not an int: refused)
DEFAULT_CHANNEL_MULT = {
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    28: (1, 2, 2),
}


class UNetModelWrapper(nn.Module):
    """``UNetModel(dim=(1, 28, 28), num_channels=32, num_res_blocks=1, class_cond=True, num_classes=10)``.

    Example::

        model = UNetModel(dim=(1, 28, 28), num_channels=32, num_res_blocks=1)
        v = model(t, x)                      # t (B,) or a 0-dim tensor, x (B, 1, 28, 28)
    """

    def __init__(
        self,
        dim: Sequence[int],
        num_channels: int,
        num_res_blocks: int,
        channel_mult: Sequence[int] | None = None,
        learn_sigma: bool = False,
        class_cond: bool = False,
        num_classes: int = NUM_CLASSES,
        use_checkpoint: bool = False,
        attention_resolutions: str = "16",
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        dropout: float = 0,
        resblock_updown: bool = False,
        use_fp16: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        dim = tuple(dim)
        if len(dim) != 3:
            raise ValueError(f"UNetModel: dim must be (C, H, W), got {dim}")
        if learn_sigma:
            raise ValueError(
                "UNetModel: learn_sigma=True (a variance output) is not supported; flow matching does not use it"
            )
        if channel_mult is None:
            if dim[-1] not in DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"UNetModel: no default channel_mult for image size {dim[-1]} (TorchCFM's sizes: "
                    f"{sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult"
                )
            channel_mult = DEFAULT_CHANNEL_MULT[dim[-1]]
        if any(float(m) != int(m) for m in channel_mult):
            raise ValueError(f"UNetModel: channel_mult must hold whole numbers here, got {tuple(channel_mult)}")
        self.num_classes = int(num_classes) if class_cond else None
        self.unet = UNet(
            dim, channels=num_channels, channel_mult=[int(m) for m in channel_mult], num_classes=self.num_classes
        )

    def forward(self, t: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("UNetModel: give y if and only if the model is class-conditional (class_cond=True)")
        t = torch.as_tensor(t, device=x.device)
        while t.dim() > 1:
            t = t[:, 0]
        if t.dim() == 0:
            t = t.repeat(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"UNetModel: t must be 0-dim or hold one time per item ({x.shape[0]}), got shape {tuple(t.shape)}"
            )
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"UNetModel: y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        return self.unet(x, t, y)


UNetModel = UNetModelWrapper
