"""`python -m trainpilot.cli`, the same as the `trainpilot` command."""

import sys

from trainpilot.cli.main import main

sys.exit(main())
