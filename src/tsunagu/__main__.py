import sys

from tsunagu.cli import main

sys.exit(main())
