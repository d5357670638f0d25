"""pytest over this checkout without installing it (a bare GPU image): setup.py maps services/, rag/ and
ringattn/ into the `longbow` package at install time; extending the package's search path does the same.

    python3 scripts/pytest_checkout.py tests/engine/test_gpu_step.py ...
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # last: the checkout's top-level folders must shadow nothing installed
import longbow  # noqa: E402

longbow.__path__.append(str(ROOT))
import pytest  # noqa: E402

sys.exit(pytest.main(["-p", "no:cacheprovider", "-q", *sys.argv[1:]]))
