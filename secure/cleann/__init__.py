"""CLEANN (Javaheripi, Samragh et al., ICCAD 2020): an online Trojan shield by
sparse recovery. ``analyzers`` (input and latent dictionaries), ``victims``
(backdoored classifiers), ``shield`` (the combined detector and label
recovery), peers (``strip``, ``neural_cleanse``), the ``adaptive`` attacker,
the ``fixed_point`` datapath and ``fpga_model``; ``study`` and ``section``
run and report them."""
