"""``python -m airlock``: the same as the ``airlock`` command."""

from airlock.cli import main

main()
