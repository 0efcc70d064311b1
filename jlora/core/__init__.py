"""The core: the config, which modules are targeted, the adapter math and its variants, tree transforms, merge.

`variants` holds LoRA and DoRA (and the initialisations) as values, and `adapted` the one adapted call that every
front-end hands a layer call to.

Nothing here knows a front-end (linen, NNX, Equinox, Haiku), a file format or a model.
"""
