"""`python -m jlora`: the `jlora` command."""

import sys

from jlora.cli import main

sys.exit(main())
