"""``python -m ortmux.worker.engine.kernels``: build the LoRA kernel beside its source."""

from ortmux.worker.engine.kernels import main

main()
