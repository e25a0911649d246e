"""`python -m proxy.cli ...`: the same as the `energy-proxy` command."""

from __future__ import annotations

import sys

from proxy.cli.main import main

sys.exit(main())
