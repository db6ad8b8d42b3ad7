"""TorchCFM's ``torchcfm.models``: the tutorials' ``MLP`` and ``GradModel`` (:mod:`.models`) and the image
``UNetModel`` (:mod:`.unet`), so ``from torchcfm.models import MLP`` keeps working with the import renamed."""

from .models import MLP, GradModel
from .unet import UNetModel, UNetModelWrapper

__all__ = ["MLP", "GradModel", "UNetModel", "UNetModelWrapper"]
