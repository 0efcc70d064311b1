"""Front-ends: how each kind of model exposes its adapted layers (linen interception, NNX and Equinox surgery,
Haiku interception, plain trees). They discover call sites and hand them to the core; they hold no math."""
