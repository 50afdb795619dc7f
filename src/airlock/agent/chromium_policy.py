"""Chromium's enterprise policy for a browser VM: its own background traffic off.

A login needs the login page and nothing else; Chromium by itself also asks Google for
component updates (``update.googleapis.com``, ``clients2.google.com``), variations,
Safe Browsing lists, spell-check dictionaries, search suggestions, and, for the browser
sign-in, ``accounts.google.com/ListAccounts``. Each such request is one the egress proxy
denies (quietly, as known noise), and one the person does not need. Enterprise policy
switches them off where a policy exists; the command-line flags
(``--disable-background-networking``, ``--disable-component-update``) cover the rest.

Debian's Chromium reads managed policy from ``/etc/chromium/policies/managed/*.json``. In a
microVM the agent writes it there (``install``); in a sandbox ``/etc`` is the host's,
read-only, so the runtime binds a copy of ``/etc/chromium`` with the policy added
(``etc_overlay``) over it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("airlock.agent")

ETC_CHROMIUM = Path("/etc/chromium")
POLICY_FILE = "policies/managed/airlock.json"

# Policy names and values as in Chromium's policy list (chromeenterprise.google/policies).
POLICY: dict[str, Any] = {
    "ComponentUpdatesEnabled": False,  # update.googleapis.com, clients2.google.com
    "BrowserSignin": 0,  # no browser sign-in: no accounts.google.com ListAccounts
    "SyncDisabled": True,
    "SafeBrowsingProtectionLevel": 0,  # safebrowsing.googleapis.com list updates
    "ChromeVariations": 2,  # no variations seed (clientservices.googleapis.com)
    "MetricsReportingEnabled": False,
    "UrlKeyedAnonymizedDataCollectionEnabled": False,
    "SearchSuggestEnabled": False,
    "AlternateErrorPagesEnabled": False,  # no www.google.com "link doctor"
    "NetworkPredictionOptions": 2,  # no preconnect or prefetch of guessed hosts
    "SpellcheckEnabled": False,  # no dictionary downloads (redirector.gvt1.com)
    "SpellCheckServiceEnabled": False,
    "TranslateEnabled": False,
    "PasswordManagerEnabled": False,  # no "Save password?" over the page
    "PasswordLeakDetectionEnabled": False,  # no passwordsleakcheck-pa.googleapis.com
    "AutofillAddressEnabled": False,
    "AutofillCreditCardEnabled": False,
    "BackgroundModeEnabled": False,
    "DefaultBrowserSettingEnabled": False,
    "PromotionalTabsEnabled": False,
    "EnableMediaRouter": False,  # no Cast discovery
    "DnsOverHttpsMode": "off",
    "BuiltInDnsClientEnabled": False,
    "PrivacySandboxPromptEnabled": False,
    "ShoppingListEnabled": False,
}


def policy_json() -> bytes:
    return (json.dumps(POLICY, indent=2, sort_keys=True) + "\n").encode()


def install(etc: Path = ETC_CHROMIUM) -> bool:
    """Write the policy into ``etc`` (a microVM's own ``/etc/chromium``). True when it is
    there afterwards; False (logged) when ``etc`` is read-only and lacks it."""
    path = etc / POLICY_FILE
    data = policy_json()
    try:
        if path.read_bytes() == data:
            return True
    except OSError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return True
    except OSError as exc:
        log.warning("chromium policy not installed at %s: %s", path, exc.strerror)
        return False


def etc_overlay(dest: Path, source: Path = ETC_CHROMIUM) -> Path:
    """A copy of ``source`` (Debian's ``master_preferences`` and the rest) with the policy
    added, to bind over ``/etc/chromium``. Returns ``dest``."""
    if source.is_dir():
        shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
    (dest / POLICY_FILE).parent.mkdir(parents=True, exist_ok=True)
    (dest / POLICY_FILE).write_bytes(policy_json())
    return dest
