"""How one cell's ranks are started; the runner sees only ``Launcher`` (``base``)."""
