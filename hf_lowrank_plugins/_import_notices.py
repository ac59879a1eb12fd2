"""Two third-party import-time notices dropped, before anything imports their library.

bitsandbytes 0.50 logs at import, on CPUs with AVX512-BF16, that it could not load its optional hub
kernel for 4-bit matmuls (the ``kernels`` package is absent) and that it uses its own CPU kernel
instead: a warning in every process that imports PEFT, quantized or not, and in the ``hf-lowrank``
CLI's quiet output, which no later setting can hide. Only that record is dropped; everything else
bitsandbytes logs stays.

Where the ``kernels`` package is installed (transformers 5 pulls it in), bitsandbytes does load that
kernel, and offline (``HF_HUB_OFFLINE=1``, as every run here is) ``kernels`` warns that it skips its
publisher trust check for the cached kernel: the same notice in every process, on every command.
"""

import logging

KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"

logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith(KERNELS_NOTICE)
)

TRUST_NOTICE = "Skipping publisher trust check for 'kernels-community/"

logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not record.getMessage().startswith(TRUST_NOTICE)
)
