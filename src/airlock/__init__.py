"""Airlock: the control plane for per-user AI-coding microVMs.

It boots a throwaway browser VM for a vendor CLI's OAuth login, shows it to the user over
noVNC, captures and encrypts the credentials, hands them to the user's CLI VM, and destroys
the browser VM on a durable deadline (see ``domain.deadlines``), never early and never leaked.
"""

__version__ = "0.1.0"
