"""`deepreduce train --auto-resume` under `torchrun --max-restarts=1` (tests/test_elastic.py).

    torchrun --standalone --nproc_per_node=2 --max-restarts=1 tests/workers/elastic.py KILL_AT TRAIN_ARGS...

In the first attempt rank 1 kills itself with SIGKILL when it reaches step KILL_AT (0:
never), as a crashed machine would; torchrun then restarts every worker, and training
continues from the newest checkpoint all ranks hold."""

from __future__ import annotations

import os
import signal
import sys

from deepreduce.apps import train


def main() -> int:
    kill_at, argv = int(sys.argv[1]), sys.argv[2:]
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if kill_at and first_attempt and os.environ.get("RANK") == "1":
        schedule = train.learning_rate

        def learning_rate(step, args):  # called once per step
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return schedule(step, args)

        train.learning_rate = learning_rate
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
