"""`python -m snapvisor` is the `snapvisor` command."""

import sys

from snapvisor.cli import main

sys.exit(main())
