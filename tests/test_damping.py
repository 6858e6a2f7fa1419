import pytest

from hookinf import ConfigurationError, Damping, HookinfError
from hookinf.damping import as_damping


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
