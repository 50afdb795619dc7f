"""Use cases: start/complete/cancel a session, create/delete a VM, and the scheduler and
reconciler loops that keep the durable deadlines. ``core.Core`` wires them together."""
