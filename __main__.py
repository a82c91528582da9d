"""``python -m retain``: the same as the ``retain`` command."""

from retain.entry import main

main()
