"""Run `deepreduce bench soak` from a checkout: python benchmarks/soak.py --help"""

import sys

from deepreduce.apps.bench.soak import main

if __name__ == "__main__":
    sys.exit(main())
