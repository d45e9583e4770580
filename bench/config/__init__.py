"""Configuration at the door: the knob vocabulary (``knobs``), suite files expanded into cells (``suite``), and which technique each knob value names (``techniques``)."""
