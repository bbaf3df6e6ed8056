import sys

from catcurate.cli import main

sys.exit(main())
