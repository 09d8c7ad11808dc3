"""`python -m mka_core <command>`."""

import sys

from mka_core.cli.main import main

sys.exit(main())
