import sys

from edgescreen.appliance.cli import main

sys.exit(main())
