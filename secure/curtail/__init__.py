"""CuRTAIL (Rouhani, Samragh, Javidi, Koushanfar): adversarial-input detection
by Modular Robust Redundancy -- unsupervised defender modules whose
disagreement with the victim flags an input. In progress (issue 12):
``latent`` (the latent defender); attacks live in ``secure.attacks``."""
