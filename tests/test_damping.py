import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hookinf
from hookinf import ConfigurationError, Damping, HookinfError
from hookinf.damping import DEFAULT_RELATIVE, as_damping, default_damping


def test_default_is_relative_one_tenth():
    assert Damping() == Damping(relative=0.1)
    assert Damping().value(4.0) == pytest.approx(0.4)
    assert as_damping(0.5).value(2.0) == pytest.approx(1.0)
    assert Damping(absolute=1e-3).value(123.0) == 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda: Damping(relative=0.1, absolute=0.1),
        lambda: Damping(relative=-1.0),
        lambda: Damping(absolute=float("nan")),
        lambda: as_damping("0.1"),
        lambda: as_damping(True),
    ],
    ids=["both", "negative", "nan", "string", "bool"],
)
def test_bad_damping_is_refused(make):
    with pytest.raises(ConfigurationError) as exc:
        make()
    assert isinstance(exc.value, HookinfError)


# -------------------------------------------------------------------------------------------- per-method defaults
ROOT = Path(__file__).resolve().parents[1]
#: What docs/methods.md ("Defaults, measured") states, from benchmarks/results/defaults.md.
DOCUMENTED = {"exact": 1.0, "kfac": 0.1, "ekfac": 0.1, "datainf": 0.1, "lissa": 0.1, "identity": 0.1}


def _problem() -> tuple[nn.Module, list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    return model, [(x[:12], y[:12]), (x[12:], y[12:])], [(x[:3], y[:3])]


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_default_relative_damping_per_method_is_the_documented_one():
    assert dict(DEFAULT_RELATIVE) == DOCUMENTED
    for method, relative in DOCUMENTED.items():
        assert default_damping(method) == Damping(relative=relative)
    assert default_damping("a-custom-method") == Damping(relative=0.1)


def test_the_docs_table_states_the_defaults():
    """The last column of the table in docs/methods.md's "Defaults, measured" section is each method's default."""
    page = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    section = page.split("## Defaults, measured", 1)[1].split("\n## ", 1)[0]
    stated = {
        match["method"]: match["default"]
        for match in re.finditer(r"^\| `(?P<method>\w+)` \|.*\| (?P<default>[^|]+?) \|$", section, re.MULTILINE)
    }
    assert stated.keys() == DOCUMENTED.keys() - {"lissa"}, stated  # lissa was not measured: it keeps 0.1
    for method, text in stated.items():
        assert text == ("none" if method == "identity" else f"{DOCUMENTED[method]:g}"), (method, text)


@pytest.mark.parametrize("method", ["exact", "kfac", "ekfac"])
def test_fit_and_influence_without_damping_use_the_methods_default(method: str):
    model, train, query = _problem()
    curvature = hookinf.fit(model, train, _loss, method=method, progress=False)
    assert curvature.damping == Damping(relative=DOCUMENTED[method])
    plain = hookinf.influence(model, train, query, _loss, method=method, progress=False)
    explicit = hookinf.influence(model, train, query, _loss, method=method, damping=DOCUMENTED[method], progress=False)
    assert plain.damping == pytest.approx(curvature.lambdas, rel=1e-12)
    torch.testing.assert_close(plain.total, explicit.total, rtol=0, atol=0)
    own = hookinf.influence(model, train, query, _loss, method=curvature.with_damping(Damping(relative=0.5)),
                            progress=False)  # fmt: skip
    assert own.damping == pytest.approx(curvature.with_damping(Damping(relative=0.5)).lambdas, rel=1e-12)


def test_auto_and_query_methods_take_the_default_of_the_method_used():
    model, train, _ = _problem()
    auto = hookinf.fit(model, train, _loss, progress=False)  # small layers: exact
    assert auto.method == "exact"
    assert auto.damping == Damping(relative=DOCUMENTED["exact"])
    for method in ("datainf", "exact"):
        plain = hookinf.self_influence(model, train, _loss, method=method, progress=False)
        explicit = hookinf.self_influence(model, train, _loss, method=method, damping=DOCUMENTED[method],
                                          progress=False)  # fmt: skip
        assert plain.damping == pytest.approx(explicit.damping, rel=1e-12)
        torch.testing.assert_close(plain.total, explicit.total, rtol=0, atol=0)
