# The signal handlers go first, before any heavy import (see signals.py).
from .signals import install_stop_handlers

_stop = install_stop_handlers()

import sys  # noqa: E402

from .main import main  # noqa: E402

sys.exit(main(stop=_stop))
