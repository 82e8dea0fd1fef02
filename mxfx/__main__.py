import sys

from mxfx.cli import main

sys.exit(main())
