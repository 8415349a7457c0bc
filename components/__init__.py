"""TorchX components: one generic component (`components/stage.py:stage`) that
runs `python -m peflow.cli <stage> ...` under torchrun for any registered
stage, with the stage's registry resources as defaults.

Wiring only: what runs, where, with which resources. The logic is in peflow.
"""
