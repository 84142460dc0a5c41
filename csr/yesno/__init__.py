"""Yes/no self-rewarding: the optional closed-set stage of a CSR round (`yesno.enabled`)."""
