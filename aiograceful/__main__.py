"""``python -m aiograceful demo | probe``: see :mod:`aiograceful._cli`."""

from ._cli import main

raise SystemExit(main())
