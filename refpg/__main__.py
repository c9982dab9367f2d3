"""`python -m refpg …` is the `refpg` command."""

import sys

from refpg.cli import main

sys.exit(main())
