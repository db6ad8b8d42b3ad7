"""Optional dependencies: one place that imports them and, when one is missing, says which extra installs it.

The core package needs only numpy; the progress bars, the figures, the toy data sets and the compat
layers' hand-offs live in extras (pyproject.toml ``[project.optional-dependencies]``). A bare
``ModuleNotFoundError: No module named 'tqdm'`` at the end of a long run tells a user nothing about the
fix, so every optional import goes through :func:`require`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "require", "EXTRAS"]

#: top-level module -> (pip package, the smallest loom_kernels extra that installs it)
EXTRAS = {
    "tqdm": ("tqdm", "torch"),
    "matplotlib": ("matplotlib", "demo"),
    "sklearn": ("scikit-learn", "demo"),
    "ot": ("POT", "torchcfm"),
    "torchdiffeq": ("torchdiffeq", "flow_matching"),
    "scipy": ("scipy", "test"),
}


class MissingDependency(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the pip package and the extra."""


def require(module: str, feature: str) -> ModuleType:
    """Imports ``module`` (e.g. ``"matplotlib.pyplot"``) or raises :class:`MissingDependency` naming the extra.

    ``feature`` says what needed it, e.g. ``"the demo's figure"``.

    Example:
        >>> tqdm = require("tqdm", "progress bars")
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the module is there but one of its own imports is broken: show that error as is
        package, extra = EXTRAS.get(top, (top, None))
        how = f"pip install 'loom_kernels[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
        raise MissingDependency(f"{feature} needs {package}, which is not installed: {how}", name=top) from exc
