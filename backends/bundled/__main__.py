import sys

from backends.bundled.install import main

sys.exit(main())
