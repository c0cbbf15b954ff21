import sys

from pocd.cli import main

sys.exit(main())
