"""The answer verifiers (gopd.eval) and the demo's paired interval."""

import pytest

from gopd.eval import is_correct_strict, verify
from gopd.experiments.stats import paired_difference


@pytest.mark.parametrize("text, answer", [
    ("8", "8"), (" 8.\n", "8"), ("\\boxed{8}", "8"), ("7 + 1 = 8", "8"), ("7+1=8.", "8"),
    ("12 - 20 = -8", "-8"), ("109", "109"), ("2 + 3 * 4 = 14", "14"), ("12--3 = 15", "15"), ("007 + 1 = 8", "8"),
    ("7 / 2 = 3.5", "3.5"), ("20 - 4 - 3 = 13", "13"),
])
def test_strict_accepts_just_the_answer(text, answer):
    assert is_correct_strict(text, answer) and verify(text, answer, "strict")


@pytest.mark.parametrize("text, answer", [
    ("7 + 1 = 8\n\nThis is a classic", "8"),   # text after the answer
    ("The answer is 8.", "8"),                  # a number inside prose
    ("8 apples", "8"), ("x = 8", "8"), ("8 = 8", "8"), ("7 + 1 = 8 = 8", "8"), ("8..", "8"),
    ("7 + 1 = 9", "8"), ("", "8"), ("To solve this, 7 + 1 = 8", "8"),
    ("7 + 2 = 8", "8"), ("2 + 3 * 4 = 20", "20"), ("20 - 4 - 3 = 19", "19"), ("8 / 0 = 8", "8"),  # false equations
])
def test_strict_rejects_anything_else(text, answer):
    assert not is_correct_strict(text, answer)
    # ... some of which the lenient verifier (last number anywhere) accepts
    if text in ("The answer is 8.", "7 + 1 = 8\n\nThis is a classic", "8 apples"):
        assert verify(text, answer, "lenient")


def test_unknown_verifier_is_a_clear_error():
    with pytest.raises(ValueError, match="verifier"):
        verify("8", "8", "exact")


def test_paired_difference():
    before = [0, 0, 1, 1, 0, 0, 1, 0]
    after = [1, 0, 1, 1, 1, 1, 1, 0]
    d, half = paired_difference(after, before)
    assert d == pytest.approx(3 / 8)
    diffs = [1, 0, 0, 0, 1, 1, 0, 0]
    mean = 3 / 8
    sd = (sum((x - mean) ** 2 for x in diffs) / 7) ** 0.5
    assert half == pytest.approx(1.96 * sd / 8 ** 0.5)
    assert paired_difference(before, before) == (0.0, 0.0)
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1, 0], [1])


def test_config_verifier_must_be_known():
    from gopd import config as config_mod

    with pytest.raises(config_mod.ConfigError, match="verifier"):
        config_mod.load(None, ("verifier=exact",))
    assert config_mod.load(None, ("verifier=strict",)).verifier == "strict"
