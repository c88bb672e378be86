"""`python -m capsbench.suite.cli`: the same as the `capsbench` console script."""

import sys

from capsbench.suite.cli import main

sys.exit(main())
