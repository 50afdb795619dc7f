"""VM runtimes: one module per backend, each implementing ``base.Runtime``.

Only this package starts processes or VMs. Runtimes do not import each other.
"""
