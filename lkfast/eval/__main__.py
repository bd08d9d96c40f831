import sys

from lkfast.eval.cli import main

sys.exit(main())
