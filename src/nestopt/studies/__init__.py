"""Studies that test the claims of the source documents (``nestopt study NAME --out DIR``)."""
