"""Model constructors, instantiated from the ``model`` config group."""
