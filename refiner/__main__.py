"""`python -m refiner` runs the command line."""

import sys

from refiner.cli import main

sys.exit(main())
