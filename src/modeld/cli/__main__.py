"""``python -m modeld.cli``: the ``modeld`` command."""

from modeld.cli.main import main

raise SystemExit(main())
