"""The egress proxy: the only way out of a browser VM.

A browser VM has no network but loopback. Its Chromium (``--proxy-server``) and its login
programs (``HTTPS_PROXY``) talk to ``127.0.0.1:3128`` inside the VM, which the guest agent
forwards to a Unix socket on the host where one ``EgressProxy`` per VM listens. The proxy
lets a connection through only where that VM's ``EgressPolicy`` (``domain.egress_policy``:
host rules, wildcards, SSO bundles, learn mode) allows it, optionally mapping a name that
exists only for Airlock (the demo IdP's ``*.airlock.test``) to a real address, tells its
``observer`` every decision (the controller counts denials per session), and logs every
connection: a denial as a warning, the browser's own known background noise quietly.

It speaks just enough HTTP/1.1 to be a forward proxy: ``CONNECT host:port`` for TLS tunnels
and absolute-form requests (``GET http://host:port/path``) for plain HTTP, one request per
connection (``Connection: close`` both ways), so that every request is checked against the
policy and nothing is smuggled behind a first, allowed one. It never logs request lines,
headers or bodies: they may carry authorization codes and tokens.
"""

from airlock.egress.proxy import EgressProxy

__all__ = ["EgressProxy"]
