"""Run `deepreduce bench bandwidth` from a checkout: python benchmarks/bandwidth.py --help"""

import sys

from deepreduce.apps.bench.bandwidth import main

if __name__ == "__main__":
    sys.exit(main())
