import sys

from discovery_mdc.cli import main

sys.exit(main())
