"""``python -m replugchar.cli``."""

from . import main

main()
