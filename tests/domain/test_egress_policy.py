"""The egress policy's matcher: a rule allows what it says and nothing more."""

from __future__ import annotations

import pytest

from airlock.domain.egress_policy import (
    BUNDLES,
    Decision,
    EgressPolicy,
    HostRule,
    Overrides,
    PolicyError,
    is_ip_literal,
    normalise_host,
    parse_items,
    registrable_domain,
    render_items,
    rule,
    rules,
)


def policy(*texts: str, **kw: object) -> EgressPolicy:
    return EgressPolicy("test", allow=rules(*texts), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "host",
    ["a.example.com", "b.a.example.com", "A.EXAMPLE.COM", "a.example.com.", "x-1.example.com"],
)
def test_a_wildcard_allows_names_under_its_suffix(host: str) -> None:
    assert policy("*.example.com").decide(host, 443).decision is Decision.ALLOWED


@pytest.mark.parametrize(
    "host",
    [
        "example.com",  # the apex: *.example.com is only what is under it
        "example.com.evil.net",
        "evilexample.com",
        "a.evilexample.com",
        "example.com.",
        "aexample.com",
        "a.example.co",
        "a.example.com.evil.net",
        "a.example.com:443",
    ],
)
def test_a_wildcard_never_matches_more_than_it_says(host: str) -> None:
    assert policy("*.example.com").decide(host, 443).decision is Decision.DENIED


def test_an_exact_rule_is_exact() -> None:
    p = policy("claude.ai")
    assert p.decide("claude.ai", 443).decision is Decision.ALLOWED
    assert p.decide("CLAUDE.AI.", 443).decision is Decision.ALLOWED
    for other in ("www.claude.ai", "claude.ai.evil.net", "xclaude.ai", "claude.aii"):
        assert p.decide(other, 443).decision is Decision.DENIED, other


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "2130706433",  # 127.0.0.1 as one decimal number
        "0x7f.1",
        "0x7f000001",
        "0177.0.0.1",
        "017700000001",
        "127.1",
        "10.0.0.1.",
        "::1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "fe80::1%eth0",
        "169.254.169.254",
        "a.b.0x10",  # a last label that is a number makes the whole an IPv4 address
        "example.123",
    ],
)
def test_ip_literals_are_denied_in_every_spelling(host: str) -> None:
    assert is_ip_literal(host)
    assert normalise_host(host) is None
    # Even a policy that would allow everything on the port.
    verdict = policy("*.example.com", learn=True).decide(host, 443)
    assert verdict.decision is Decision.DENIED


@pytest.mark.parametrize("text", ["127.0.0.1", "2130706433", "[::1]:443", "0x7f.1:80", "*.10"])
def test_a_rule_cannot_name_an_ip_address(text: str) -> None:
    with pytest.raises(PolicyError):
        rule(text)


def test_ports_are_part_of_the_rule() -> None:
    p = policy("a.example:8443", "b.example")
    assert p.decide("a.example", 8443).decision is Decision.ALLOWED
    assert p.decide("a.example", 443).decision is Decision.DENIED
    assert p.decide("b.example", 443).decision is Decision.ALLOWED
    assert p.decide("b.example", 80).decision is Decision.DENIED
    verdict = p.decide("b.example", 22)
    assert verdict.decision is Decision.DENIED and "port 22" in verdict.reason
    # Learn mode lets unknown names through on known ports only.
    learning = policy("b.example", learn=True)
    assert learning.decide("c.example", 443).decision is Decision.LEARNED
    assert learning.decide("c.example", 80).decision is Decision.LEARNED
    assert learning.decide("c.example", 22).decision is Decision.DENIED


def test_names_are_normalised_before_matching() -> None:
    assert normalise_host("Bücher.Example.") == "xn--bcher-kva.example"
    assert normalise_host("xn--bcher-kva.example") == "xn--bcher-kva.example"
    assert normalise_host("BÜCHER.example") == "xn--bcher-kva.example"
    p = policy("*.xn--bcher-kva.example")
    assert p.decide("www.bücher.example", 443).decision is Decision.ALLOWED
    assert policy("bücher.example").rules == (HostRule("xn--bcher-kva.example"),)
    # Full-width dots and letters fold to ASCII (UTS 46), so they cannot dodge a rule.
    assert normalise_host("\uff43\uff4c\uff41\uff55\uff44\uff45\uff0e\uff41\uff49") == "claude.ai"
    for bad in ("", ".", "a..b", "-a.com", "a_b.com", "a b.com", "xn--zz.com", "a" * 64 + ".com"):
        assert normalise_host(bad) is None, bad
    assert normalise_host("a." * 127 + "a") is None  # 255 characters


def test_operator_deny_wins_and_required_stays() -> None:
    base = EgressPolicy(
        "oauth2",
        allow=rules("*.idp.test", "cdn.test"),
        required=rules("idp.test"),
        bundles=frozenset({"google"}),
    )
    p = base.with_overrides(Overrides(deny="static.idp.test,@google,idp.test"))
    assert p.decide("static.idp.test", 443).decision is Decision.DENIED
    assert p.decide("other.idp.test", 443).decision is Decision.ALLOWED
    assert p.decide("idp.test", 443).decision is Decision.ALLOWED  # required: the endpoints
    assert p.decide("www.gstatic.com", 443).decision is Decision.DENIED
    replaced = base.with_overrides(Overrides(policy="only.test", allow="@apple"))
    assert replaced.decide("cdn.test", 443).decision is Decision.DENIED
    assert replaced.decide("only.test", 443).decision is Decision.ALLOWED
    assert replaced.decide("appleid.apple.com", 443).decision is Decision.ALLOWED
    assert replaced.decide("idp.test", 443).decision is Decision.ALLOWED
    with pytest.raises(PolicyError, match="unknown SSO bundle"):
        base.with_overrides(Overrides(allow="@myspace"))
    with pytest.raises(PolicyError, match="not a host name"):
        base.with_overrides(Overrides(allow="exa mple.com"))


def test_browser_noise_is_told_apart_from_a_page_denial() -> None:
    p = policy("claude.ai")
    assert p.decide("update.googleapis.com", 443).decision is Decision.NOISE
    assert p.decide("update.googleapis.com", 80).decision is Decision.NOISE
    assert p.decide("update.googleapis.com", 8443).decision is Decision.DENIED
    assert p.decide("cdn.example", 443).decision is Decision.DENIED
    # A provider that needs a noisy host (the Google bundle) still gets it.
    google = EgressPolicy("g", bundles=frozenset({"google"}))
    assert google.decide("accounts.google.com", 443).decision is Decision.ALLOWED


def test_settings_syntax_round_trips() -> None:
    found, bundles = parse_items(" a.example , *.b.example:8443,@Google,,")
    assert found == (HostRule("a.example"), HostRule("*.b.example", 8443))
    assert bundles == {"google"}
    text = render_items(
        [("z.example", 443), ("a.example", 4001), ("fonts.gstatic.com", 443), ("a.example", 4001)]
    )
    assert text == "a.example:4001,z.example,@google"
    again, bundles = parse_items(text)
    assert again == (HostRule("a.example", 4001), HostRule("z.example")) and bundles == {"google"}
    for bad in ("a.example:0", "a.example:99999", "a.example:x", "*.com.*", "a.*.com", "*.com"):
        with pytest.raises(PolicyError):
            parse_items(bad)


def test_bundles_cite_their_sources_and_hold_names_only() -> None:
    assert set(BUNDLES) == {"google", "microsoft", "apple", "github"}
    for bundle in BUNDLES.values():
        assert bundle.sources and bundle.rules
        assert all(r.port == 443 for r in bundle.rules)


def test_metric_labels_are_registrable_domains() -> None:
    assert registrable_domain("a.b.gstatic.com") == "gstatic.com"
    assert registrable_domain("www.bbc.co.uk") == "bbc.co.uk"
    assert registrable_domain("localhost") == "localhost"
