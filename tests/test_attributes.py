"""Device attribute rules and canonical forms (shared/attributes.py)."""

from __future__ import annotations

import pytest

from shared.attributes import (
    AttributeRuleError,
    canonical_locale,
    check_app_version,
    check_time_zone,
    locale_chain,
    locale_matches,
    select_variant,
    version_key,
)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("de", "de"),
        ("DE", "de"),
        ("de-AT", "de-AT"),
        ("de-at", "de-AT"),
        ("en_US", "en-US"),
        ("zh-hans-cn", "zh-Hans-CN"),
        ("ZH_HANS", "zh-Hans"),
        ("pt-br", "pt-BR"),
        ("es-419", "es-419"),
        ("fil", "fil"),
        ("sr-Latn", "sr-Latn"),
    ],
)
def test_locales_are_stored_in_canonical_case(given: str, canonical: str) -> None:
    assert canonical_locale(given) == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "d",
        "deutsch",
        "de-",
        "de--AT",
        "de-AT-",
        "de-DE-1996",
        "en-US-x-priv",
        "de-A",
        "de-4190",
        "de AT",
        "de\n",
        "dé",
        "١٢",
        None,
        5,
        ["de"],
    ],
)
def test_other_locales_are_refused(bad: object) -> None:
    with pytest.raises(AttributeRuleError, match="must be a BCP 47 locale"):
        canonical_locale(bad)


def test_a_locale_shortens_subtag_by_subtag_never_to_a_sibling() -> None:
    assert locale_chain("zh-Hans-CN") == ["zh-Hans-CN", "zh-Hans", "zh"]
    variants = {"fr-FR": 1, "zh": 2, "de-AT": 3}
    assert select_variant("fr-CA", variants) is None
    assert select_variant("zh-Hant-TW", variants) == "zh"
    assert select_variant("de", variants) is None  # a shorter locale never takes a longer variant
    assert select_variant(None, variants) is None


@pytest.mark.parametrize(
    "zone", ["Europe/Berlin", "America/New_York", "UTC", "Asia/Kolkata", "America/Argentina/Buenos_Aires"]
)
def test_iana_time_zones_are_accepted(zone: str) -> None:
    assert check_time_zone(zone) == zone


@pytest.mark.parametrize(
    "bad", ["europe/berlin", "Mars/Olympus", "", "Europe/", "../etc/passwd", "+02:00", "x" * 300, 1, None]
)
def test_unknown_time_zones_are_refused(bad: object) -> None:
    with pytest.raises(AttributeRuleError, match="must be an IANA time zone name"):
        check_time_zone(bad)


@pytest.mark.parametrize("good", ["0", "2", "2.3", "2.3.10", "1.0.0.0", "999999.999999.999999.999999"])
def test_app_versions_are_accepted(good: str) -> None:
    assert check_app_version(good) == good


@pytest.mark.parametrize(
    "bad", ["", "v2", "2.", ".2", "2..3", "02", "2.03", "1.2.3.4.5", "1000000", "2.3-beta", "2.3 ", "٢", 2, 2.3, None]
)
def test_other_app_versions_are_refused(bad: object) -> None:
    with pytest.raises(AttributeRuleError, match="1 to 4 dot-separated whole numbers"):
        check_app_version(bad)


def test_app_versions_compare_numerically_missing_parts_zero() -> None:
    ordered = ["0", "1.9", "1.10", "2", "2.0.1", "2.3", "2.9", "2.10", "10", "999999.999999.999999.999999"]
    keys = [version_key(v) for v in ordered]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert version_key("2.3") == version_key("2.3.0") == version_key("2.3.0.0")
    assert version_key("999999.999999.999999.999999") == 10**24 - 1


def test_a_locale_filter_matches_the_locale_and_its_extensions() -> None:
    assert locale_matches("de", "de") and locale_matches("de", "de-AT") and locale_matches("zh-Hans", "zh-Hans-CN")
    assert not locale_matches("de-AT", "de") and not locale_matches("de", "dea") and not locale_matches("de", None)
