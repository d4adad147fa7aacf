"""The dtype names of the frozen weights (``model.weight_dtype``, ``rlr sample --dtype``); LoRA stays float32."""

import torch

#: The ``weight_dtype`` / ``--dtype`` names and the dtypes they stand for.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
