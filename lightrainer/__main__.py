"""``python -m lightrainer`` = the ``lightrainer`` command."""

import sys

from lightrainer.cli import main

sys.exit(main())
