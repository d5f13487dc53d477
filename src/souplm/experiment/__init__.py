"""The SoupLM experiment on real small models: building the model family (`family`) and its pieces.

`python -m souplm.experiment.family build [--quick]` builds SmolLM2-135M-Instruct and its homologous
variants (LLaVA, math, Shakespeare) into a content-addressed cache; `family.family_paths()` finds them.
"""

import os

# The build trains on a small CPU machine shared with other work. With OpenMP's default busy-waiting, a
# torch thread that waits for a descheduled sibling spins at full speed: measured on the shared 2-core
# machine, a training step burnt 3-4x the CPU time (and 2.5x the wall time) of the same step with
# passive waiting. It must be set before torch loads OpenMP; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
