"""TorchCFM's ``torchcfm.models.unet``: ``UNetModel`` (TorchCFM's name for its ``UNetModelWrapper``)."""

from .unet import UNetModel, UNetModelWrapper

__all__ = ["UNetModel", "UNetModelWrapper"]
