"""Run `deepreduce bench codecs` from a checkout: python benchmarks/codecs.py --help"""

import sys

from deepreduce.apps.bench.codecs import main

if __name__ == "__main__":
    sys.exit(main())
