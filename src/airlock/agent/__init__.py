"""The guest agent: ``server`` runs inside every VM, ``client`` is the controller's side.

``server`` and ``protocol`` use the standard library only, so they run on a guest image
that has nothing but ``python3-minimal``.
"""
