"""Run `deepreduce bench convergence` from a checkout: python benchmarks/convergence.py --help"""

import sys

from deepreduce.apps.bench.convergence import main

if __name__ == "__main__":
    sys.exit(main())
