"""Egress policy as data: which hosts a browser VM may reach for one provider's login.

A policy is a set of **host rules** (``claude.ai``, ``*.gstatic.com``, each with one port,
443 unless given), the **SSO bundles** it takes (``google``, ``microsoft``, ``apple``,
``github``: the hosts a "Continue with ..." button needs), operator **deny** rules that win
over everything, and **learn mode** (allow any host name on a known port, and record it).

Matching is on normalised names only (``normalise_host``): lower case, no trailing dot,
IDNA (UTS 46) to its ASCII form. An exact rule matches that name alone. A wildcard rule
``*.example.com`` matches every name *under* ``example.com`` at any depth
(``a.example.com``, ``a.b.example.com``) and never the apex ``example.com`` itself, nor
``example.com.evil.net`` or ``evilexample.com``: the match is on whole labels. An IP
literal, in any form a browser or resolver would accept (``127.0.0.1``, ``2130706433``,
``0x7f.1``, ``017700000001``, ``[::1]``), is never allowed, whatever the rules say, and a
rule cannot name one. A port no rule names is denied.

The settings syntax (``parse_items``/``render_items``) is a comma-separated list of items:
``host``, ``host:port``, ``*.suffix``, ``*.suffix:port`` or ``@bundle``. ``airlock egress
suggest`` prints a policy in it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum

import idna

DEFAULT_PORT = 443
LEARN_PORTS = frozenset({80, 443})  # learn mode allows any name on these and the rules' ports

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NUMBER = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")  # WHATWG URL: a label that is an IPv4 part


class PolicyError(ValueError):
    """A rule or a setting that cannot be read; the message names the bad item."""


class Decision(StrEnum):
    ALLOWED = "allowed"  # a rule allows it
    LEARNED = "learned"  # no rule allows it, learn mode let it through (and records it)
    DENIED = "denied"  # no rule allows it: the page misses something
    NOISE = "noise"  # denied, and a known background request of the browser itself


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IP address in any spelling a URL parser accepts: IPv6 (with
    or without brackets) or IPv4 in the WHATWG forms (a last label that is a number, in
    decimal, octal or hex: ``2130706433``, ``0x7f.1``, ``0177.0.0.1``)."""
    text = host.strip().lower().removesuffix(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        return True  # a name never has a colon: an IPv6 literal, valid or not
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    labels = text.split(".")
    return bool(labels) and _NUMBER.fullmatch(labels[-1]) is not None


def normalise_host(raw: str) -> str | None:
    """The canonical ASCII form of a host name (lower case, no trailing dot, IDNA UTS 46),
    or None when ``raw`` is not a host name (empty, bad characters, too long, or an IP
    literal: see ``is_ip_literal``)."""
    text = raw.strip().removesuffix(".")
    if not text or is_ip_literal(text):
        return None
    if text.isascii():
        name = text.lower()
    else:
        try:
            name = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return None
    if len(name) > 253 or is_ip_literal(name):
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if any(label.startswith("xn--") for label in labels):
        try:  # a punycode label must decode to a valid IDNA label
            idna.decode(name)
        except (idna.IDNAError, UnicodeError):
            return None
    return name


@dataclass(frozen=True, slots=True, order=True)
class HostRule:
    """One allowed (or denied) destination: a name or ``*.suffix``, and one port."""

    pattern: str  # normalised: "example.com" or "*.example.com"
    port: int = DEFAULT_PORT

    @property
    def wildcard(self) -> bool:
        return self.pattern.startswith("*.")

    def matches(self, host: str, port: int) -> bool:
        """``host`` must already be normalised (``normalise_host``)."""
        if port != self.port:
            return False
        if self.wildcard:
            return host.endswith(self.pattern[1:])  # ".example.com": whole labels only
        return host == self.pattern

    def __str__(self) -> str:
        return self.pattern if self.port == DEFAULT_PORT else f"{self.pattern}:{self.port}"


def rule(text: str, port: int = DEFAULT_PORT) -> HostRule:
    """A rule from ``host``, ``host:port``, ``*.suffix`` or ``*.suffix:port``."""
    item = text.strip()
    name, sep, port_text = item.rpartition(":")
    if sep:
        if not port_text.isascii() or not port_text.isdigit():
            raise PolicyError(f"{item!r}: the port must be a number")
        port = int(port_text)
    else:
        name = item
    if not 0 < port < 65536:
        raise PolicyError(f"{item!r}: the port must be 1-65535")
    wildcard = name.startswith("*.")
    base = name[2:] if wildcard else name
    if "*" in base:
        raise PolicyError(f"{item!r}: a wildcard is only allowed as the first label (*.suffix)")
    if is_ip_literal(base):
        raise PolicyError(f"{item!r}: IP addresses are never allowed, name a host")
    host = normalise_host(base)
    if host is None:
        raise PolicyError(f"{item!r} is not a host name")
    if wildcard and "." not in host:
        raise PolicyError(f"{item!r}: a wildcard needs at least two labels (*.example.com)")
    return HostRule(f"*.{host}" if wildcard else host, port)


def rules(*texts: str) -> tuple[HostRule, ...]:
    return tuple(rule(t) for t in texts)


@dataclass(frozen=True, slots=True)
class Bundle:
    """The hosts a single sign-on button needs, with where the list comes from."""

    name: str
    rules: tuple[HostRule, ...]
    sources: tuple[str, ...]


# Each bundle lists the hosts of that identity provider's sign-in page: its own host, the
# static hosts its page loads scripts, styles, fonts and images from, and nothing of the
# provider's other products. Sources per bundle; where a list is our reading of a page
# rather than the vendor's published allowlist, the source says so.
BUNDLES: dict[str, Bundle] = {
    b.name: b
    for b in (
        Bundle(
            "google",
            rules(
                "accounts.google.com",  # the sign-in pages
                "ssl.gstatic.com",  # images of the sign-in page
                "www.gstatic.com",  # its scripts and styles
                "fonts.gstatic.com",  # its fonts
                "fonts.googleapis.com",  # font CSS
                "apis.google.com",  # the JS client (gapi) some "Sign in with Google" use
                "accounts.youtube.com",  # cross-domain sign-in (CheckConnection); see note
                "lh3.googleusercontent.com",  # account pictures in the account chooser
                "play.google.com",  # the page's log pings (/log); failing them is harmless
            ),
            (
                # Google Cloud's published "required domains" for a proxy: accounts.google.com
                # for sign-in, www/ssl/fonts.gstatic.com for static content, apis.google.com.
                "https://docs.cloud.google.com/docs/get-started/required-domains",
                # Google Workspace's allowlist for authentication (accounts.google.com/o/oauth2,
                # oauth2.googleapis.com, www.googleapis.com/oauth2).
                "https://support.google.com/a/answer/9012184",
                # Uncertain: accounts.youtube.com, lh3.googleusercontent.com, play.google.com
                # and fonts.googleapis.com are what the sign-in page is seen to load in
                # public HAR captures, not on a Google allowlist; denying them leaves the
                # sign-in working with missing pictures/fonts.
            ),
        ),
        Bundle(
            "microsoft",
            rules(
                "login.microsoftonline.com",  # Entra ID (work and school accounts)
                "login.live.com",  # personal Microsoft accounts
                "login.microsoft.com",
                "aadcdn.msauth.net",  # the sign-in page's scripts and styles (CDN)
                "aadcdn.msftauth.net",
                "logincdn.msauth.net",
                "lgincdn.msauth.net",
                "logincdn.msftauth.net",
                "aadcdn.msauthimages.net",  # tenant branding images
                "aadcdn.msftauthimages.net",
                "account.live.com",  # personal accounts: sign-up and recovery
            ),
            (
                # Microsoft 365 "URLs and IP address ranges", ID 56 (authentication and
                # identity: login.microsoftonline.com, *.msauth.net, *.msftauth.net,
                # *.msauthimages.net, *.msftauthimages.net, login.live.com).
                "https://learn.microsoft.com/microsoft-365/enterprise/urls-and-ip-address-ranges",
                # Intune's endpoint list names login.microsoftonline.com, login.microsoft.com.
                "https://learn.microsoft.com/mem/intune/fundamentals/intune-endpoints",
                # Uncertain: Microsoft publishes the CDNs as wildcards (*.msauth.net); the
                # exact CDN host names here are those the sign-in page loads in public HAR
                # captures. An operator who sees a denied *.msauth.net host can add
                # "*.msauth.net,*.msftauth.net" to the allow setting.
            ),
        ),
        Bundle(
            "apple",
            rules(
                "appleid.apple.com",  # Sign in with Apple: the authorize pages
                "appleid.cdn-apple.com",  # their scripts, styles and the JS SDK
                "idmsa.apple.com",  # the account authentication service the page calls
                "www.apple.com",  # fonts and images the page takes from apple.com
            ),
            (
                # Apple's "Use Apple products on enterprise networks" names the Apple
                # Account hosts (appleid.apple.com, idmsa.apple.com) for proxies.
                "https://support.apple.com/101555",
                # Apple's Sign in with Apple JS docs load the SDK from appleid.cdn-apple.com.
                "https://developer.apple.com/documentation/sign_in_with_apple/sign_in_with_apple_js",
                # Uncertain: www.apple.com (fonts) is seen in HAR captures of the authorize
                # page, not on an Apple allowlist.
            ),
        ),
        Bundle(
            "github",
            rules(
                "github.com",  # /login, /login/oauth/authorize, /session
                "github.githubassets.com",  # the page's scripts, styles, fonts
                "avatars.githubusercontent.com",  # the account picture on the authorize page
                "api.github.com",
            ),
            (
                # GitHub's "Allowing access to GitHub's services from a restricted network"
                # points at the REST API's /meta "domains" list (github.com,
                # *.githubassets.com, *.githubusercontent.com, api.github.com).
                "https://docs.github.com/en/get-started/using-github/allowing-access-to-githubs-services-from-a-restricted-network",
                "https://api.github.com/meta",
            ),
        ),
    )
}


# What Chromium itself fetches in the background, whoever's login runs, on port 80 or 443.
# The agent switches most of it off by enterprise policy (agent.chromium_policy); a request
# that still arrives is denied quietly: counted, no warning per connection, no notice to the
# person. Seen with the policy on (Chromium 156, the demo login): update.googleapis.com on
# 443 and 80 (the component updater's security-critical components, which
# ComponentUpdatesEnabled does not stop).
KNOWN_NOISE: tuple[HostRule, ...] = rules(
    "update.googleapis.com",  # component updater (ComponentUpdatesEnabled)
    "clients2.google.com",  # extension/component updates, CRLSets
    "clients2.googleusercontent.com",
    "clients1.google.com",
    "clientservices.googleapis.com",  # variations seed
    "safebrowsing.googleapis.com",  # Safe Browsing (SafeBrowsingProtectionLevel)
    "accounts.google.com",  # ListAccounts: browser sign-in (BrowserSignin)
    "optimizationguide-pa.googleapis.com",
    "content-autofill.googleapis.com",
    "www.google.com",  # connectivity checks, search suggestions
    "redirector.gvt1.com",
    "edgedl.me.gvt1.com",
    "dl.google.com",
    "passwordsleakcheck-pa.googleapis.com",  # after a sign-in (PasswordLeakDetectionEnabled)
)


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    host: str  # normalised name, or the raw text when it is not a name
    port: int
    reason: str


@dataclass(frozen=True, slots=True)
class Overrides:
    """An operator's changes to a provider's policy (``AIRLOCK_EGRESS_<PROVIDER>_*``)."""

    policy: str | None = None  # replaces the provider's own rules and bundles
    allow: str = ""  # added rules and @bundles
    deny: str = ""  # denied rules (win over every allow); @bundle drops a bundle
    learn: bool = False


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """What one provider's browser VM may reach. ``targets`` send names that exist only
    for Airlock (the demo IdP's ``*.airlock.test``) to a real address."""

    provider: str
    allow: tuple[HostRule, ...] = ()
    bundles: frozenset[str] = frozenset()
    deny: tuple[HostRule, ...] = ()
    learn: bool = False
    required: tuple[HostRule, ...] = ()  # never removed by an override (oauth2 endpoints)
    targets: tuple[tuple[HostRule, tuple[str, int]], ...] = field(default=())

    def __post_init__(self) -> None:
        unknown = sorted(self.bundles - BUNDLES.keys())
        if unknown:
            raise PolicyError(f"unknown SSO bundle(s) {', '.join(unknown)} (known: {known()})")

    @property
    def rules(self) -> tuple[HostRule, ...]:
        """Every allow rule: the required ones, the policy's own, then each bundle's."""
        out: dict[HostRule, None] = dict.fromkeys(self.required)
        out.update(dict.fromkeys(self.allow))
        for name in sorted(self.bundles):
            out.update(dict.fromkeys(BUNDLES[name].rules))
        return tuple(out)

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(r.port for r in self.rules)

    def decide(self, raw_host: str, port: int) -> Verdict:
        """Allowed, learned, denied or noise, and why (for the log)."""
        host = normalise_host(raw_host)
        if host is None:
            what = "an IP address" if is_ip_literal(raw_host) else "not a host name"
            return Verdict(Decision.DENIED, raw_host.strip().lower(), port, what)
        if any(r.matches(host, port) for r in self.required):
            return Verdict(Decision.ALLOWED, host, port, "required")
        if any(r.matches(host, port) for r in self.deny):
            return Verdict(Decision.DENIED, host, port, "an operator's deny rule")
        if any(r.matches(host, port) for r in self.rules):
            return Verdict(Decision.ALLOWED, host, port, "a rule")
        if port in LEARN_PORTS and any(r.matches(host, DEFAULT_PORT) for r in KNOWN_NOISE):
            return Verdict(Decision.NOISE, host, port, "the browser's own background traffic")
        if self.learn and port in LEARN_PORTS | self.ports:
            return Verdict(Decision.LEARNED, host, port, "learn mode")
        if port not in self.ports | LEARN_PORTS:
            return Verdict(Decision.DENIED, host, port, f"port {port} is not on the policy")
        return Verdict(Decision.DENIED, host, port, f"no rule allows it for {self.provider}")

    def target(self, host: str, port: int) -> tuple[str, int]:
        """Where to connect for an allowed ``host:port`` (itself, unless a target maps it)."""
        for pattern, address in self.targets:
            if pattern.matches(host, port):
                return address
        return host, port

    def with_overrides(self, overrides: Overrides) -> EgressPolicy:
        """This policy as an operator changed it. Raises ``PolicyError`` on a bad item."""
        policy = self
        if overrides.policy is not None:
            allow, bundles = parse_items(overrides.policy)
            policy = replace(policy, allow=allow, bundles=frozenset(bundles))
        added, more = parse_items(overrides.allow)
        denied, dropped = parse_items(overrides.deny)
        return replace(
            policy,
            allow=tuple(dict.fromkeys(policy.allow + added)),
            bundles=(policy.bundles | more) - dropped,
            deny=tuple(dict.fromkeys(policy.deny + denied)),
            learn=policy.learn or overrides.learn,
        )

    def describe(self) -> str:
        """One line for the log: the rules, the bundles, the denials."""
        parts = [str(r) for r in dict.fromkeys(self.required + self.allow)]
        parts += [f"@{b}" for b in sorted(self.bundles)]
        text = ", ".join(parts) or "nothing"
        if self.deny:
            text += "; denied: " + ", ".join(str(r) for r in self.deny)
        return text


def known() -> str:
    return ", ".join(sorted(BUNDLES))


def parse_items(text: str) -> tuple[tuple[HostRule, ...], set[str]]:
    """Rules and bundle names from the settings syntax: ``a.com, *.b.com:8443, @google``."""
    found: list[HostRule] = []
    bundles: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("@"):
            name = item[1:].strip().lower()
            if name not in BUNDLES:
                raise PolicyError(f"unknown SSO bundle {item!r} (known: {known()})")
            bundles.add(name)
            continue
        found.append(rule(item))
    return tuple(dict.fromkeys(found)), bundles


def render_items(hosts: Iterable[tuple[str, int]], *, bundles: Iterable[str] = ()) -> str:
    """The settings syntax for observed ``(host, port)`` pairs, sorted, each exact; a host
    that a bundle covers is written as that bundle (``@google``) instead."""
    items: dict[str, None] = {}
    names = set(bundles)
    exact: set[HostRule] = set()
    for host, port in hosts:
        covering = [b.name for b in BUNDLES.values() if any(r.matches(host, port) for r in b.rules)]
        if covering:
            names.update(covering[:1])
        else:
            exact.add(HostRule(host, port))
    for r in sorted(exact, key=lambda r: (r.pattern, r.port)):
        items[str(r)] = None
    for name in sorted(names):
        items[f"@{name}"] = None
    return ",".join(items)


def registrable_domain(host: str) -> str:
    """The last two labels of a name (three under a two-letter second-level like co.uk):
    a bounded label for metrics, without a public-suffix list."""
    labels = host.split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in {"co", "com", "ac", "org"}:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])
