"""The grounded world's diagnostics from the command line; the logic is `csr.world.diagnostics`.

    python scripts/world_diagnostics.py {clip,pairs,causes,greedy,pope,scores,yesno} ...   (--help for each)
"""

from csr.world.diagnostics import main

if __name__ == "__main__":
    raise SystemExit(main())
