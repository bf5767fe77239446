"""LoRA adapters: Hugging Face PEFT <-> Megatron-Bridge adapters, derived from the base bridge's rules.

:mod:`mapgen.lora.peft` reads and renders PEFT adapters as data; :mod:`mapgen.lora.plan` maps them to and from
Megatron adapters through the base rules' ops, lays them out over TP/EP/PP and merges them. Both are pure; the
CLI (``mapgen adapter``, ``mapgen merge``) does the I/O and the runtime (:mod:`mapgen.runtime.adapters`) the
Megatron forward of the proof.
"""
