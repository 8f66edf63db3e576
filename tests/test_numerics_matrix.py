"""make test-numerics: the kernel-set configurations it runs the numerics tests under."""

from .numerics_matrix import configurations

THREADS = ("OMP_NUM_THREADS", "LIPEXP_TEST_THREADS")
AVX512 = {"sse4_2", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}


def _kernels(configs):
    return [{k: v for k, v in c.items() if k not in THREADS} for c in configs]


def test_each_kernel_set_the_cpu_offers_runs_with_one_and_two_threads():
    configs = configurations(AVX512)
    kernels = _kernels(configs)
    for kernel in kernels:
        threads = {(c["OMP_NUM_THREADS"], c["LIPEXP_TEST_THREADS"]) for c in configs
                   if {k: v for k, v in c.items() if k not in THREADS} == kernel}
        assert threads == {("1", "1"), ("2", "2")}  # the one_thread fixture's tests too
    capabilities = {k.get("ATEN_CPU_CAPABILITY") for k in kernels} - {None}
    assert capabilities == {"default", "avx2", "avx512"}
    # MKL and oneDNN capped at AVX2 where the CPU has more, and at their oldest paths
    assert {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"} in kernels
    assert {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"} in kernels
    assert {"MKL_CBWR": "COMPATIBLE"} in kernels


def test_kernel_sets_the_cpu_lacks_are_not_asked_for():
    kernels = _kernels(configurations({"sse4_2", "avx2"}))
    assert {k.get("ATEN_CPU_CAPABILITY") for k in kernels} - {None} == {"default", "avx2"}
    assert {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"} not in kernels
    # an unknown CPU (no /proc/cpuinfo) still runs the portable paths
    assert {k.get("ATEN_CPU_CAPABILITY") for k in _kernels(configurations(set()))} >= {"default"}
