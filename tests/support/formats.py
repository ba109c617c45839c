"""The quantized formats the tests run, each skipped where this machine cannot serve it."""
import pytest

from blockdiff.model import cpu_kernels

W4A8 = pytest.param("w4a8", marks=pytest.mark.skipif(not cpu_kernels.available(),
                                                     reason="w4a8 runs on blockdiff's CPU kernels, not built here"))
# the formats `quantization="auto"` can time on this machine (fp16 and the ATen ones always)
AUTO_CANDIDATES = {"none", "int4", "int8", "fp16"} | ({"w4a8"} if cpu_kernels.available() else set())
