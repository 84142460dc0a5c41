"""A grounded synthetic world (shapes on a grid) and its base models, for measuring hallucination.

- `csr.world.generate`: scenes, rendering, captions, POPE and CHAIR files (deterministic by seed).
- `csr.world.train_base`: a tiny open_clip trained contrastively and a tiny LLaVA trained by SFT
  on the world, with the open_clip vision trunk converted into the LLaVA vision tower.
- `csr.world.build`: `csr world --out DIR`, building both (cached, resumable).
"""

from csr.world.generate import WorldConfig, generate_world  # noqa: F401  (re-exported)
