"""The SoupLM experiment on real small models: building the model family (`family`) and its pieces.

`python -m souplm.experiment.family build [--quick]` builds SmolLM2-135M-Instruct and its homologous
variants (LLaVA, math, Shakespeare) into a content-addressed cache; `family.family_paths()` finds them.
"""
