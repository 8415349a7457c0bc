"""TorchX components: one function per distributed stage, each returning an
AppDef that runs `python -m peflow.cli <stage> ...` under torchrun.

Wiring only: what runs, where, with which resources. The logic is in peflow.
"""
