"""``python -m aiograceful demo | probe``: see :mod:`aiograceful._tools.cli`."""

from ._tools.cli import main

raise SystemExit(main())
