"""`python -m ec262` is the `ec262` command."""

import sys

from ec262.cli import main

sys.exit(main())
