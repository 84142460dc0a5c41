"""`csr world`: build a world (csr.world.build), its alignment-only LLaVA (`align`), or a suite of
worlds with the recipe's arms on each (`suite`, csr.world.suite). Only this entry knows all three, so
the suite (which runs `csr run`, which builds worlds) and the builder do not import each other."""

from __future__ import annotations


def main(argv=None) -> int:
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "align":
        from csr.world.build import main_align

        return main_align(argv[1:])
    if argv and argv[0] == "suite":
        from csr.world.suite import main as main_suite

        return main_suite(argv[1:])
    from csr.world.build import main as main_build

    return main_build(argv)
