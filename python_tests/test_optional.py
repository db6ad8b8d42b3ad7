"""Optional dependencies name the extra that installs them; outputs default outside a source checkout."""

import sys

import pytest

from loom_kernels import _optional
from loom_kernels._optional import MissingDependency, require
from loom_kernels.experiments.common import default_out


@pytest.mark.parametrize(
    "module, package, extra",
    [
        ("tqdm.auto", "tqdm", "torch"),
        ("matplotlib.pyplot", "matplotlib", "demo"),
        ("sklearn.datasets", "scikit-learn", "demo"),
    ],
)
def test_missing_dependency_names_package_and_extra(monkeypatch, module, package, extra):
    top = module.split(".")[0]
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, top, None)  # import of a None entry raises ModuleNotFoundError
    with pytest.raises(MissingDependency) as exc:
        require(module, "the thing")
    assert str(exc.value) == (
        f"the thing needs {package}, which is not installed: "
        f"pip install 'loom_kernels[{extra}]' (or pip install {package})"
    )
    assert isinstance(exc.value, ModuleNotFoundError) and exc.value.name == top


def test_require_returns_the_module_and_keeps_other_errors():
    import json

    assert require("json", "x") is json
    with pytest.raises(MissingDependency, match="needs not_a_module_xyz, which is not installed: pip install not_a"):
        require("not_a_module_xyz", "x")
    assert set(_optional.EXTRAS) >= {"tqdm", "matplotlib", "sklearn"}


def test_missing_dependency_in_the_demo_fails_before_training(monkeypatch, tmp_path):
    from loom_kernels.experiments import demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r"the demo's figure needs matplotlib.*loom_kernels\[demo\]"):
        demo.run(demo._parser().parse_args(["--quick", "--out", str(tmp_path / "d")]))
    assert not (tmp_path / "d").exists()


def test_default_out_is_beside_a_checkout(monkeypatch, tmp_path):
    checkout = tmp_path / "loom_kernels"
    (checkout / "src" / "loom_kernels").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    (checkout / "examples").mkdir()
    for cwd in (checkout, checkout / "examples"):
        monkeypatch.chdir(cwd)
        assert default_out("loom_demo") == str(tmp_path / "loom_demo")
    monkeypatch.chdir(tmp_path)
    assert default_out("loom_demo") == "loom_demo"


def test_train_cli_without_scikit_learn_names_the_extra(monkeypatch, tmp_path):
    from loom_kernels.cli import train as train_cli

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--data", "moons", "--coupling", "ot", "--out", str(tmp_path / "r"), "--steps", "1"])
    assert str(exc.value.code) == (
        "python -m loom_kernels.train: error: --data moons: the 'moons' data set needs scikit-learn, which is not "
        "installed: pip install 'loom_kernels[demo]' (or pip install scikit-learn)"
    )
