"""``python -m callward.core.cli``: the ``callward`` command, as the console script runs it."""

from callward.core.cli import main

main()
