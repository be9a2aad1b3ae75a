"""Run `deepreduce bench fuzz` from a checkout: python benchmarks/fuzz.py --help"""

import sys

from deepreduce.apps.bench.fuzz import main

if __name__ == "__main__":
    sys.exit(main())
