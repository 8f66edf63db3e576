"""Rerun the numerics-sensitive tests under each CPU kernel set this machine offers.

A float result can differ in its last bits between ATen's vectorised kernels (default, AVX2,
AVX-512), MKL's and oneDNN's code paths, and thread counts (reduction order). A test whose
outcome flips on those bits passes where it was written and fails elsewhere, so the tests
marked ``numerics`` are run once per configuration:

  ATEN_CPU_CAPABILITY = default, avx2 and avx512 (those the CPU supports)
  MKL_ENABLE_INSTRUCTIONS=AVX2 with ONEDNN_MAX_CPU_ISA=AVX2 (where the CPU has more than AVX2)
  MKL_ENABLE_INSTRUCTIONS=SSE4_2 with ONEDNN_MAX_CPU_ISA=SSE41 (the oldest paths)
  MKL_CBWR=COMPATIBLE (MKL's reproducible path: other kernels again; on this project's AMD
    machines it reproduced a failure first seen on an Intel Xeon's AVX-512 MKL kernels)
  each with OMP_NUM_THREADS = 1 and 2.

Usage: ``make test-numerics`` (or ``python tests/numerics_matrix.py [--all] [pytest args]``);
``--all`` runs the whole default suite per configuration instead of the marked tests. Exits
non-zero if any configuration fails and prints one line per configuration. Each
configuration of the marked tests takes about 2-3 minutes on 2 cores (14 configurations on
an AVX-512 CPU: about half an hour); ``--all`` about 10 minutes each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKED = "numerics and not slow and not gpu"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def configurations(flags: set[str]) -> list[dict[str, str]]:
    """Environment settings to run under: one per kernel set, times 1 and 2 threads."""
    kernels = [{"ATEN_CPU_CAPABILITY": "default"}]
    if "avx2" in flags:
        kernels.append({"ATEN_CPU_CAPABILITY": "avx2"})
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        kernels.append({"ATEN_CPU_CAPABILITY": "avx512"})
        kernels.append({"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    kernels.append({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"})
    kernels.append({"MKL_CBWR": "COMPATIBLE"})
    # OMP_NUM_THREADS for the tests that keep torch's default, LIPEXP_TEST_THREADS for those
    # pinned by the one_thread fixture (tests/conftest.py)
    return [{**k, "OMP_NUM_THREADS": str(n), "LIPEXP_TEST_THREADS": str(n)}
            for k in kernels for n in (1, 2)]


# settings of the caller's environment that would change what each configuration runs
INHERITED = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
             "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LIPEXP_TEST_THREADS")


def main(argv: list[str]) -> int:
    whole = "--all" in argv
    extra = [a for a in argv if a != "--all"]
    if any(a == "-m" or a.startswith("-m") and not a.startswith("--") for a in extra):
        sys.exit("numerics_matrix: -m would replace the numerics selection; pass test paths "
                 "or -k instead (or --all for the whole suite)")
    selection = [] if whole else ["-m", MARKED]
    base = {k: v for k, v in os.environ.items() if k not in INHERITED}
    failed = []
    for env in configurations(cpu_flags()):
        label = " ".join(f"{k}={v}" for k, v in env.items())
        start = time.perf_counter()
        # -p no:cacheprovider: the runs share no last-failed state; -q keeps one summary each
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection,
               *extra]
        proc = subprocess.run(cmd, cwd=REPO, env={**base, **env}, capture_output=True,
                              text=True)
        if proc.returncode == 5:  # pytest: no test collected, the same in every configuration
            sys.exit(f"numerics_matrix: no test selected by {' '.join([*selection, *extra])}")
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"[{'ok' if proc.returncode == 0 else 'FAIL'}] {label}: {summary} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        if proc.returncode != 0:
            failed.append(label)
            print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
    if failed:
        print(f"{len(failed)} configuration(s) failed:", *failed, sep="\n  ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
