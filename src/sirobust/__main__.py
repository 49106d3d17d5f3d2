"""``python -m sirobust ...`` (and ``torchrun ... -m sirobust ...``): the ``sirobust`` command line."""
import sys

from . import STARTUP_INTERRUPTED

try:
    from .cli import main
except KeyboardInterrupt:  # between the package's imports and main's: still starting
    print(STARTUP_INTERRUPTED, file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
