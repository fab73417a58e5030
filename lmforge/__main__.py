from __future__ import annotations

import sys

from lmforge.cli import main

sys.exit(main())
