import sys

from conceptctl.cli import main

sys.exit(main())
