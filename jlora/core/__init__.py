"""The core: the config, which modules are targeted, the adapter math and its variants, tree transforms, merge.

Nothing here knows a front-end (linen, NNX, Equinox, Haiku), a file format or a model.
"""
