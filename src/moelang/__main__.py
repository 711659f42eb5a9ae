import sys

from moelang.cli import main

sys.exit(main())
