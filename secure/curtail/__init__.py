"""CuRTAIL (Rouhani, Samragh, Javidi, Koushanfar): adversarial-input detection
by Modular Robust Redundancy -- unsupervised defender modules whose
disagreement with the victim flags an input. ``modules`` is the defender as
one JAX function, ``defences`` puts it and its peers behind one interface,
``study``/``section`` measure them; attacks live in ``secure.attacks``."""
