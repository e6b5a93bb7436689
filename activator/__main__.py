import sys

from activator.cli import main

sys.exit(main())
