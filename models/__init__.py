"""Model definitions. Each modeling file travels inside exported checkpoints, so it imports only torch,
transformers, the standard library and its sibling files here."""
