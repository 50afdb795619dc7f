"""The bundled demo OAuth 2.0 authorization server, for offline use and tests (``app``)."""

from airlock.demo_idp.app import create_idp_app

__all__ = ["create_idp_app"]
