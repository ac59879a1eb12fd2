"""One third-party import-time notice dropped, before anything imports its library.

bitsandbytes 0.50 logs at import, on CPUs with AVX512-BF16, that it could not load its optional hub
kernel for 4-bit matmuls (the ``kernels`` package is absent) and that it uses its own CPU kernel
instead: a warning in every process that imports PEFT, quantized or not, and in the ``hf-lowrank``
CLI's quiet output, which no later setting can hide. Only that record is dropped; everything else
bitsandbytes logs stays.
"""

import logging

KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"

logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith(KERNELS_NOTICE)
)
