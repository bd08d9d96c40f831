"""python -m lkfast.corrupt SRC DST --benchmark c|p : render ImageNet-C / ImageNet-P from a folder of images.

The command keeps its historical name, but its work is file input/output (reading SRC, encoding
JPEG and mp4, writing DST), which belongs to lkfast.data; the code is ``lkfast.data.writer.main``.
This entry point is the only place in lkfast.corrupt that imports lkfast.data, and it is never
imported by the package itself (``python -m`` runs it as a script), so lkfast.corrupt stays free of
file IO and of any import loop: lkfast.data uses lkfast.corrupt, not the other way round.
"""
import sys

from lkfast.data.writer import main

if __name__ == "__main__":
    sys.exit(main())
