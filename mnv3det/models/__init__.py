"""Task models: the MobileNetV3 backbone with a head from :mod:`heads`.

``ssdlite`` lives in :mod:`mnv3det.models.ssdlite` (paper §6.3) and ``lraspp`` in
:mod:`mnv3det.models.lraspp` (paper §6.4).
"""
