import sys

from aclab.cli import main

sys.exit(main())
