"""Peak memory of a runner is its own: a runner started by a process holding a lot of memory does not
report that process's resident memory (ru_maxrss survives execve; VmHWM does not)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "edgekd" / "bench"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is Linux's")
def test_a_runner_started_by_a_large_process_reports_its_own_peak():
    held = np.ones(1 << 27)  # 1 GiB resident in this process when the runner starts
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import runner, lm_runner; "
            "print(json.dumps([runner.peak_rss_mb(), lm_runner.peak_rss_mb()]))")
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, check=True)
    peaks = json.loads(out.stdout)
    assert held.sum() == 1 << 27
    assert all(0 < p < 512 for p in peaks), peaks  # numpy and the interpreter, far from the parent's 1 GiB
