import sys

from tskd_tune.cli import main

sys.exit(main())
