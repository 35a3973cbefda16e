import sys

from sagabox.cli import main

sys.exit(main())
