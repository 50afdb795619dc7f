"""The guest agent: ``server`` runs inside every VM, ``client`` is the controller's side.

Everything here but ``client`` runs inside a VM (``server`` and its jobs ``capture``,
``display``, ``lease``, ``entropy``, ``files``, ``streams``, ``tasks``; ``mux``, ``vsock``,
``guest``, ...) and uses the standard library only, so it runs on a guest image that has
nothing but ``python3-minimal``; an import-linter contract in pyproject.toml keeps it so.
"""
