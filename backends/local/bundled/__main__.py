import sys

from backends.local.bundled.install import main

sys.exit(main())
