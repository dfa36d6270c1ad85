"""The tiny CuRTAIL settings the digits (8x8) tests share: every module and
peer, small enough to fit in seconds."""

from secure import sparse
from secure.cleann import analyzers
from secure.curtail import defences, input_defender, latent, lid, peers, residual

CONFIG = defences.CurtailConfig(
    latent=latent.LatentConfig(steps=50),
    input=input_defender.InputDefenderConfig(
        patch=analyzers.PatchConfig(size=4, stride=2), images_per_class=40,
        dictionary=sparse.DictConfig(n_atoms=16, n_nonzero=3, iters=3)),
    residual=residual.ResidualConfig(dictionary=sparse.DictConfig(n_atoms=16, n_nonzero=3,
                                                                  iters=3), images=400),
    magnet=peers.MagNetConfig(steps=150),
    lid=lid.LIDConfig(ks=(5, 10), batch=40, n_train=200))
