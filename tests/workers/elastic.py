"""`deepreduce train` whose rank 1 dies mid-run (tests/test_elastic.py).

    torchrun --standalone --nproc_per_node=2 --max-restarts=1 tests/workers/elastic.py KILL_AT TRAIN_ARGS...

In the first attempt rank 1 kills itself with SIGKILL when it reaches step KILL_AT (0:
never), as a crashed machine would. Under torchrun --max-restarts every worker then
restarts and training continues from the newest checkpoint all ranks hold; launched
without an agent, the surviving rank must fail on its own with a clear error."""

from __future__ import annotations

import os
import signal
import sys

from deepreduce import cli
from deepreduce.apps import train


def main() -> None:
    kill_at, argv = int(sys.argv[1]), sys.argv[2:]
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if kill_at and first_attempt and os.environ.get("RANK") == "1":
        schedule = train.learning_rate

        def learning_rate(step, args):  # called once per step
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return schedule(step, args)

        train.learning_rate = learning_rate
    sys.argv = ["deepreduce", "train", *argv]
    cli.entry()  # exits the way the deepreduce command does


if __name__ == "__main__":
    main()
