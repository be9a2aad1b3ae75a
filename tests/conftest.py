from __future__ import annotations

import pytest
import torch

from deepreduce.apps.data import stdlib_corpus
from deepreduce.apps.models import ByteTransformer, resnet


def model_gradient(model: torch.nn.Module, seq_len: int, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """The flat gradient of one backward pass on real stdlib text."""
    torch.manual_seed(seed)
    corpus = stdlib_corpus(max_bytes=4 << 20)
    x, y = corpus.batch("train", batch, seq_len, torch.Generator().manual_seed(seed))
    model.zero_grad()
    model.loss(x, y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.fixture(scope="session")
def real_gradients() -> dict[str, torch.Tensor]:
    """Gradients of a small transformer LM and a ResNet-18 on stdlib source text."""
    torch.manual_seed(0)
    return {
        "transformer": model_gradient(ByteTransformer(d_model=128, n_layers=2, n_heads=4, seq_len=128), 128),
        "resnet18": model_gradient(resnet("resnet18"), 1024),
    }


# --- Horovod -----------------------------------------------------------------------------------

HOROVOD_BUILD_ENV = "DEEPREDUCE_TEST_HOROVOD"


def horovod_problem() -> str | None:
    """Why horovodrun cannot be used as installed, or None when it can (or must be built)."""
    import importlib
    import importlib.util

    try:
        importlib.invalidate_caches()
        import horovod.torch as hvd
    except ImportError as exc:
        if importlib.util.find_spec("horovod") is None:
            return None
        return f"horovod is installed but does not import ({exc}); rebuild it with launch/install-horovod.sh"
    if not hvd.gloo_built():
        return "horovod was built without Gloo; rebuild it with launch/install-horovod.sh"
    return None


@pytest.fixture(scope="session")
def horovodrun() -> list[str]:
    """The horovodrun command, building Horovod first when it is not installed.

    Horovod 0.28.1 must be built from source with a C++17 patch (launch/install-horovod.sh,
    about 2 minutes on 2 cores; the wheel is cached, so a new environment on the same
    machine installs it in seconds). Skips, saying why, only where Horovod cannot be
    installed (no g++, or the package index is out of reach), or when
    DEEPREDUCE_TEST_HOROVOD=0 asks not to build it."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    problem = horovod_problem()
    assert problem is None, problem
    if importlib.util.find_spec("horovod") is None:
        if os.environ.get(HOROVOD_BUILD_ENV) == "0":
            pytest.skip(f"Horovod is not installed and {HOROVOD_BUILD_ENV}=0 asks not to build it (launch/install-horovod.sh)")
        proc = subprocess.run(["bash", str(root / "launch" / "install-horovod.sh"), "--python", sys.executable],
                              cwd=root, capture_output=True, text=True, timeout=1800)
        if proc.returncode == 3:  # the script's "cannot be installed here"
            pytest.skip(f"Horovod cannot be installed here: {proc.stderr.strip()[-400:]}")
        assert proc.returncode == 0, f"install-horovod.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        problem = horovod_problem()
        assert problem is None and importlib.util.find_spec("horovod") is not None, problem or "horovod still missing"
    launcher = Path(sys.executable).parent / "horovodrun"
    assert launcher.exists(), f"horovod is importable but {launcher} is missing"
    return [str(launcher), "--gloo", "--start-timeout", "60"]
