import sys

from tcpencap.cli import main

sys.exit(main())
