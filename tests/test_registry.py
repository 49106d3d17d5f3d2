"""The one registry class: every registry of names (attacks, losses, defenses, models, datasets) looks up,
suggests, refuses duplicates and describes the same way."""
import pytest

from sirobust.attacks.registry import ATTACKS
from sirobust.checks import UnknownNameError
from sirobust.data.registry import DATASETS
from sirobust.defenses import DEFENSES
from sirobust.losses import LOSSES
from sirobust.models.registry import MODELS
from sirobust.registry import Registry

REGISTRIES = [ATTACKS, LOSSES, DEFENSES, MODELS, DATASETS]


def nothing():
    """Does nothing."""


def test_lookup_is_case_insensitive_takes_aliases_and_suggests():
    r = Registry("thing", {"fgsm-rs": nothing}, aliases={"fast": "fgsm-rs"})
    assert r.canonical("FGSM_RS") == r.canonical("Fast") == "fgsm-rs" and r.get("fast") is nothing
    with pytest.raises(UnknownNameError, match=r"^unknown thing 'fgsm-r' \(did you mean 'fgsm-rs'\?\); "
                                               r"valid things: fgsm-rs$"):
        r.get("fgsm-r")
    assert r.get("nope", None) is None and r.describe("fast") == "Does nothing."


@pytest.mark.parametrize("taken", ["fgsm-rs", "FGSM_RS", "fast"])
def test_a_name_or_alias_is_registered_once(taken):
    r = Registry("thing", {"fgsm-rs": nothing}, aliases={"fast": "fgsm-rs"})
    with pytest.raises(ValueError, match="registered twice"):
        r.register(taken, print)
    with pytest.raises(ValueError, match="already a name or an alias"):
        r.alias(taken, "fgsm-rs")
    assert list(r) == ["fgsm-rs"]


def test_a_temporary_entry_comes_and_goes(monkeypatch):
    r = Registry("thing", {"a": nothing})
    with monkeypatch.context() as m:
        m.setitem(r, "b", print)
        assert r.names() == ["a", "b"] and r.get("B") is print
    assert r.names() == ["a"]


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_every_registry_describes_every_name_in_one_line(registry):
    assert registry.names() == sorted(registry)
    for name in registry.names():
        text = registry.describe(name.upper())
        assert text and "\n" not in text, name
    with pytest.raises(UnknownNameError, match=f"valid {registry.kind}"):
        registry.get("zz-not-a-name")
